"""`export_onnx`: the driver — plan each MoE layer, lower, export, fix the file format, check."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from .errors import OnnxDestinationError, OnnxDtypeError, OnnxExportError
from .outputs import name_outputs, output_names
from .plan import plan_layers
from .report import ExportReport, LayerExport, OnnxFile, logger
from .shapes import ExportInputs, constants_bound, default_dynamic_shapes, example_inputs
from .swap import lowered
from .targets import IR_VERSION, MSFT_DOMAIN, OPSET, Target, get_target, onnxruntime_version

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
    in eval mode and left unchanged. Graph outputs keep the model's names (`logits`,
    `last_hidden_state`, ...; outputs.py). The file appears complete or not at all: it is
    written and checked beside `f`, then moved into place.
    Raises OnnxExportError when the model cannot be exported, saying why, before any export
    work where the reason is known up front: `f` is a directory (OnnxDestinationError), the
    weights are in a dtype `target` cannot run (OnnxDtypeError: bfloat16 on "cpu").
    """
    _check_arguments(model, args, kwargs, fused, optimize, portable_layers)
    path = _destination(f)
    runtime = get_target(target)
    _check_dtypes(model, runtime)
    _require_onnx()
    inputs = example_inputs(model, args, kwargs)
    if dynamic_shapes is None:
        dynamic_shapes = default_dynamic_shapes(model, inputs)
    plans = plan_layers(model, fused=fused, target=runtime, portable_layers=portable_layers)
    with lowered(model, plans) as reached:
        names = output_names(model, inputs)
        with constants_bound(model, inputs.constants):
            program = _torch_export(model, inputs, dynamic_shapes, optimize,
                                    any(plan.form is not None for plan in plans))
    name_outputs(program, names)
    _check_fused_nodes(program, [p for p in plans if p.form is not None and p.name in reached])
    program.model.ir_version = IR_VERSION
    external = _initializer_bytes(program) > LARGE_MODEL_BYTES
    _save_checked(program, path, external)
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


def _check_arguments(model, args, kwargs, fused, optimize, portable_layers) -> None:
    """OnnxExportError naming the first argument of the wrong kind, before any work."""
    problems = []
    if not isinstance(model, nn.Module):
        problems.append(f"model={type(model).__name__} must be an nn.Module")
    if not isinstance(args, (tuple, list)):
        problems.append(f"args of type {type(args).__name__} must be a tuple of example inputs, e.g. (input_ids,)")
    if kwargs is not None and not isinstance(kwargs, dict):
        problems.append(f"kwargs={kwargs!r} must be a dict of example inputs or None")
    for name, value in (("fused", fused), ("optimize", optimize)):
        if not isinstance(value, bool):
            problems.append(f"{name}={value!r} must be True or False")
    if isinstance(portable_layers, str) or not isinstance(portable_layers, (tuple, list, set, frozenset)) \
            or not all(isinstance(n, str) for n in portable_layers):
        problems.append(f"portable_layers={portable_layers!r} must be a list of MoE layer names "
                        "(see upcycle_fx.moe_layers)")
    if problems:
        raise OnnxExportError(f"export_onnx: {problems[0]}.")

def _destination(f) -> pathlib.Path:
    if not isinstance(f, (str, os.PathLike)):
        raise OnnxExportError(f"f must be a file path (str or os.PathLike), got {type(f).__name__}")
    path = pathlib.Path(f)
    if path.is_dir() or str(f).endswith(("/", os.sep)):
        raise OnnxDestinationError(f"{f} is a directory; give the ONNX file to write, e.g. "
                                   f"{path / 'model.onnx'}")
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OnnxDestinationError(f"{blocking} is a file, so {path} cannot be created; choose "
                                   "another output path")
    return path


def _check_dtypes(model: nn.Module, runtime: Target) -> None:
    """Refuse weights the target's execution provider has no kernels for (before exporting)."""
    tensors = [*model.parameters(), *model.buffers()]
    found = {t.dtype for t in tensors if t.is_floating_point()}
    refused = sorted(str(d).removeprefix("torch.") for d in found - set(runtime.dtypes))
    if refused:
        runs = ", ".join(str(d).removeprefix("torch.") for d in runtime.dtypes)
        raise OnnxDtypeError(
            f"{type(model).__name__} has {'/'.join(refused)} weights, which onnxruntime's "
            f"{runtime.name} execution provider cannot run (it runs {runs}); cast the model first "
            f"(model.to(torch.float32); --dtype float32 on the command line) or export for a "
            f"target that runs {refused[0]}.")


def _save_checked(program, path: pathlib.Path, external: bool) -> None:
    """Save into a staging directory beside `path`, check it, then move the file(s) into place,
    so an interrupted or failed export leaves no partial file at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        program.save(staging / path.name, external_data=external)
        _check_file(staging / path.name)
        data = staging / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.with_name(data.name))
        os.replace(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise OnnxExportError(f"ONNX export needs the onnx and onnxscript packages ({error}); "
                              "install them with: pip install 'upcycle_fx[onnx]'") from None


def _torch_export(model, inputs: ExportInputs, dynamic_shapes, optimize: bool, has_fused: bool):
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
