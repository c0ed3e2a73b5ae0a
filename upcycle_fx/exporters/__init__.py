"""Exporters: turn an upcycled model into a deployable artifact.

`onnx`: an ONNX file whose MoE layers become onnxruntime's fused `com.microsoft::MoE` node where
it can express them, and a portable standard-operator lowering elsewhere (`export_onnx`).
"""

from .onnx import ExportReport, LayerExport, OnnxExportError, OnnxFile, export_onnx

__all__ = ["export_onnx", "ExportReport", "LayerExport", "OnnxExportError", "OnnxFile"]

# checkpoints (issue 5): native save/load, stock Hugging Face MoE formats, streaming conversion
from .checkpoint import load, save
from .errors import (CheckpointError, CheckpointMismatchError, HFFormatError, MissingShardError,
                     OutputExistsError, TruncatedShardError)
from .streaming import ConversionReport, convert_checkpoint

__all__ += ["save", "load", "convert_checkpoint", "ConversionReport", "CheckpointError",
            "CheckpointMismatchError", "HFFormatError", "MissingShardError", "OutputExistsError",
            "TruncatedShardError"]
