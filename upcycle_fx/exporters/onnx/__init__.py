"""ONNX export of upcycled models (issue 3; DESIGN §6).

    path = upcycle_fx.export_onnx(moe_model, "model.onnx", target="cpu")
    print(path.report)      # which MoE layers became com.microsoft::MoE nodes, which did not and why

Modules, one job each:
  targets   what each onnxruntime target (cpu / cuda) accepts; IR version and opset
  schema    the com.microsoft::MoE OpSchema the ONNX tooling needs
  fused     custom op upcycle_fx::ort_moe, its translation to com.microsoft::MoE, weight packing
  portable  the standard-operator lowering (every expert kept, same routing)
  plan      per-layer decision: fused or portable, and why
  swap      installs the lowerings during an export and restores the model afterwards
  shapes    example inputs and default dynamic dims
  report    the per-layer report attached to the returned path
  export    the driver: export_onnx
"""

from .errors import OnnxExportError
from .export import export_onnx
from .report import ExportReport, LayerExport, OnnxFile
from .targets import TARGETS

__all__ = ["export_onnx", "ExportReport", "LayerExport", "OnnxExportError", "OnnxFile", "TARGETS"]
