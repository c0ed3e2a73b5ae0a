"""What an export did: per MoE layer, fused or portable and why; plus the file's facts."""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field

logger = logging.getLogger("upcycle_fx.exporters.onnx")


@dataclass(frozen=True)
class LayerExport:
    """One MoE layer: `lowering` is "fused" (one com.microsoft::MoE node) or "portable"."""

    name: str
    lowering: str
    detail: str   # the node's form when fused, the reason when portable


@dataclass
class ExportReport:
    """Returned as `export_onnx(...).report` and logged (logger "upcycle_fx.exporters.onnx")."""

    path: pathlib.Path
    target: str
    opset: int
    ir_version: int
    external_data: bool
    layers: list[LayerExport] = field(default_factory=list)

    @property
    def fused(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.lowering == "fused"]

    @property
    def portable(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.lowering == "portable"]

    def lines(self) -> list[str]:
        head = (f"{self.path}: {len(self.fused)} of {len(self.layers)} MoE layers fused "
                f"(target {self.target}), opset {self.opset}, IR {self.ir_version}"
                f"{', external data' if self.external_data else ''}")
        return [head] + [f"  {layer.lowering:8s} {layer.name or '<model>'}: {layer.detail}"
                         for layer in self.layers]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def log(self) -> None:
        for line in self.lines():
            logger.info(line)


class OnnxFile(type(pathlib.Path())):
    """The path of the written ONNX file (a pathlib.Path) with the export's `.report` attached."""

    report: ExportReport
