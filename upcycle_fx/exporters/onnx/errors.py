"""The exporter's named error."""

from __future__ import annotations

from ...errors import UpcycleError


class OnnxExportError(UpcycleError):
    """The model (or an argument of `export_onnx`) cannot be exported to ONNX; the message says
    which step failed, why, and what to try."""


class OnnxDtypeError(OnnxExportError):
    """The model's weights are in a dtype the chosen onnxruntime target cannot run."""


class OnnxDestinationError(OnnxExportError):
    """The output path cannot hold the ONNX file (a directory, or in a directory that is a file)."""
