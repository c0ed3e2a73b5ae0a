"""`export_onnx`: the driver — plan each MoE layer, lower, export, fix the file format, check."""

from __future__ import annotations

import os
import pathlib
import re
import warnings
from typing import Any

from torch import nn

from .errors import OnnxExportError
from .plan import plan_layers
from .report import ExportReport, LayerExport, OnnxFile, logger
from .shapes import ExportInputs, constants_bound, default_dynamic_shapes, example_inputs
from .swap import lowered
from .targets import IR_VERSION, MSFT_DOMAIN, OPSET, get_target, onnxruntime_version

# Above this many bytes of weights the file keeps them as external data (protobuf's 2 GB limit).
LARGE_MODEL_BYTES = 2 * 1024**3 - 64 * 1024**2


def export_onnx(model: nn.Module, f: str | os.PathLike, *, args: tuple = (), kwargs: dict | None = None,
                fused: bool = True, target: str = "cpu", dynamic_shapes: Any = None,
                portable_layers=(), optimize: bool = True) -> OnnxFile:
    """Write `model` (typically `upcycle_fx.rewrite`'s result) to the ONNX file `f`.

    Each MoE layer becomes one onnxruntime `com.microsoft::MoE` node where that node computes
    exactly what the layer computes on `target` ("cpu" or "cuda", the onnxruntime execution
    provider the file is meant for; the kernels differ, see targets.py), and a portable
    standard-operator lowering otherwise (`fused=False`: everywhere; `portable_layers`: these
    layer names). The per-layer outcome is in the returned path's `.report` (also logged).

    `args` / `kwargs` are example inputs (optional for Hugging Face models). Batch and sequence
    dims are dynamic by default (shapes.py); `dynamic_shapes` overrides that. The file has opset
    18 and IR version 10 (seen loading and running in onnxruntime 1.23, 1.28 and 1.32; the fused
    node needs onnxruntime >= 1.23 on CPU and >= 1.28 on CUDA), weights as initializers
    (external data in `<f>.data` above 2 GB), and passes `onnx.checker`. The model is exported
    in eval mode and left unchanged.
    Raises OnnxExportError when the model cannot be exported, saying why.
    """
    path = _destination(f)
    runtime = get_target(target)
    _require_onnx()
    inputs = example_inputs(model, args, kwargs)
    if dynamic_shapes is None:
        dynamic_shapes = default_dynamic_shapes(model, inputs)
    plans = plan_layers(model, fused=fused, target=runtime, portable_layers=portable_layers)
    with lowered(model, plans) as reached, constants_bound(model, inputs.constants):
        program = _torch_export(model, inputs, dynamic_shapes, optimize,
                                any(plan.form is not None for plan in plans))
    _check_fused_nodes(program, [p for p in plans if p.form is not None and p.name in reached])
    program.model.ir_version = IR_VERSION
    external = _initializer_bytes(program) > LARGE_MODEL_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path, external_data=external)
    _check_file(path)
    report = ExportReport(path, runtime.name, OPSET, IR_VERSION, external, [
        LayerExport(plan.name, plan.lowering, plan.form.describe() if plan.form else plan.reason)
        if plan.name in reached else
        LayerExport(plan.name, "absent", "not run by the example inputs, so not in the graph")
        for plan in plans])
    report.log()
    _warn_if_runtime_too_old(report, runtime)
    result = OnnxFile(path)
    result.report = report
    return result


def _destination(f) -> pathlib.Path:
    if not isinstance(f, (str, os.PathLike)):
        raise OnnxExportError(f"f must be a file path (str or os.PathLike), got {type(f).__name__}")
    return pathlib.Path(f)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise OnnxExportError(f"ONNX export needs the onnx and onnxscript packages ({error}); "
                              "install them with: pip install 'upcycle_fx[onnx]'") from None


def _torch_export(model, inputs: ExportInputs, dynamic_shapes, optimize: bool, has_fused: bool):
    import torch

    from .fused import translation_table

    try:
        with warnings.catch_warnings():
            # Inputs sharing a dim name (input_ids, attention_mask: "seq") make torch warn.
            warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
            return torch.onnx.export(
                model, inputs.args, kwargs=inputs.kwargs, dynamo=True, dynamic_shapes=dynamic_shapes,
                opset_version=OPSET, optimize=optimize, verbose=False,
                custom_translation_table=translation_table() if has_fused else None)
    except Exception as error:  # torch raises several exporter-internal types
        raise OnnxExportError(f"torch.onnx.export could not export {type(model).__name__}: "
                              f"{_summary(error)}\nIf a dynamic dimension is the problem, pass "
                              "dynamic_shapes= (torch.export format) or other example inputs.") from error


def _summary(error: Exception) -> str:
    """The informative part of a torch.onnx error: its step and the underlying exception."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))   # torch colours its messages
    step = text.splitlines()[0].split(" Next steps")[0] if text else type(error).__name__
    if "## Exception summary" in text:
        cause = text.split("## Exception summary", 1)[1].strip().split("\n\n")[0]
        return f"{step} {cause}"
    return f"{type(error).__name__}: {step}"


def _check_fused_nodes(program, fused_plans) -> None:
    nodes = sum(1 for node in program.model.graph.all_nodes()
                if node.domain == MSFT_DOMAIN and node.op_type == "MoE")
    if nodes < len(fused_plans):
        raise OnnxExportError(f"internal error: {len(fused_plans)} fused MoE layers ran during the "
                              f"export but the graph has {nodes} com.microsoft::MoE nodes")


def _initializer_bytes(program) -> int:
    return sum(value.const_value.nbytes for value in program.model.graph.initializers.values()
               if value.const_value is not None)


def _check_file(path: pathlib.Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as error:
        raise OnnxExportError(f"{path}: the exported file fails onnx.checker: {error}") from error


def _warn_if_runtime_too_old(report: ExportReport, runtime) -> None:
    version = onnxruntime_version()
    if report.fused and version is not None and version < runtime.min_onnxruntime:
        logger.warning("the installed onnxruntime %d.%d cannot run the fused MoE nodes on %s "
                       "(needs >= %d.%d)", *version, runtime.name, *runtime.min_onnxruntime)
