"""The commands: inspect, rewrite (in memory or to a directory), export-onnx, convert.

Each command checks every argument (paths, sizes, dtypes, the rewrite's settings) before it
loads a model, and records in `args.outcome` what it is writing, so that an interruption can say
what was written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import api
from ..config import UpcycleConfig
from ..passes.stack_routing import DEFAULT_ROUTING, check_routing, routing_rows, routing_spec_text
from ..passes.verify import preserves_function
from ..report import UpcycleReport, active_parameters, count_parameters, first_tensor, relative_error
from ..sources import NATIVE_MANIFEST, ModelSourceError, declared_dtype, load_pretrained, model_directory
from .check import check_written_model, tolerance
from .display import (ProgressBars, console, decision_notes, decision_table, mlp_table, onnx_table, progress_bars,
                      report_table, step)
from .errors import CheckFailedError, UsageError
from .safety import check_onnx_output, check_output_directory, shard_size

IN_MEMORY_SHARD_SIZE = 5 * 10**9   # bytes, as transformers' "5GB"


@dataclass
class Outcome:
    """What the running command writes, for the message of an interruption."""

    target: Path | None = None
    written: bool = False


def parse_pattern(value):
    """--pattern: every_other_mlp | all | "1,3,5" (or a list from a recipe)."""
    if isinstance(value, (list, tuple)) or value in ("every_other_mlp", "all"):
        return value
    try:
        return [int(i) for i in str(value).split(",") if i.strip()]
    except ValueError:
        raise UsageError(f"--pattern {value!r}: use every_other_mlp, all, or indices like 1,3,5") from None


def upcycle_config(args) -> UpcycleConfig:
    """The UpcycleConfig of the command's options (validated there: UpcycleConfigError)."""
    return UpcycleConfig(pattern=parse_pattern(args.pattern), num_experts=args.num_experts,
                         top_k=args.top_k, routing=args.routing, capacity_factor=args.capacity_factor,
                         normalize_weights=args.normalize_weights, router_init_std=args.router_init_std,
                         expert_noise_std=args.expert_noise_std, expert_init=args.expert_init,
                         drop_ratio=args.drop_ratio, granularity=args.granularity,
                         num_shared_experts=args.num_shared_experts, shared_expert_gate=args.shared_expert_gate,
                         aux_loss_weight=args.aux_loss_weight, z_loss_weight=args.z_loss_weight,
                         scoring=args.scoring, balancing=args.balancing,
                         bias_update_speed=args.bias_update_speed, balance_scope=args.balance_scope,
                         routed_scaling_factor=args.routed_scaling_factor,
                         weight_scaling=args.weight_scaling, seed=args.seed)


def output_dtype(name: str) -> torch.dtype | None:
    """--dtype as a torch dtype; None for auto (keep the input's)."""
    return None if name == "auto" else getattr(torch, name)


def checked_device(name: str) -> str:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s); use cpu "
                             f"{'or cuda:0..' + str(count - 1) if count else ''}".rstrip())
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r}: use cpu, cuda or cuda:N")
    return name


# --------------------------------------------------------------------------- inspect


def cmd_inspect(args) -> int:
    """Every FFN candidate and its fate under --pattern (and, with --routing, each one's routing)."""
    pattern = parse_pattern(args.pattern)
    config = UpcycleConfig(pattern=pattern, routing=args.routing)  # checked before loading
    source = model_directory(args.model)
    with step("loading model"):
        loaded = load_pretrained(source)
    with step("capturing and matching FFNs"):
        mlps = api.find_mlps(loaded.model, pattern=pattern)
    routing = None
    if args.routing != DEFAULT_ROUTING:
        chosen = [d.match for d in mlps.decisions if d.status == "selected"]
        routing = check_routing(loaded.model, mlps, chosen, config)
    console.print(decision_table(mlps, routing))
    for line in decision_notes(mlps):
        console.print(line, highlight=False)
    for path, reason in mlps.capture_failures:
        console.print(f"[yellow]not captured[/] {path or '<model>'}: {reason}")
    return 0


# --------------------------------------------------------------------------- rewrite


def cmd_rewrite(args) -> int:
    config = upcycle_config(args)
    dtype, device = output_dtype(args.dtype), checked_device(args.device)
    source = model_directory(args.model)
    if args.out is not None:
        out = check_output_directory(source, args.out)
        return _rewrite_to_directory(args, source, out, config, dtype, device)
    with step("loading model"):
        loaded = load_pretrained(source, dtype=dtype, device=device)
    if args.model is None:
        loaded.name = "all-MiniLM-L6-v2"
    with step("capturing, matching and rewriting"):
        result = api.upcycle(loaded.model, config)
    console.print(mlp_table(result.mlps, result.converted))
    with step("measuring the error against the dense model on a sample input"), torch.no_grad():
        dense = first_tensor(loaded.sample.call(loaded.model))
        sparse = first_tensor(loaded.sample.call(result.model.eval()))
        error = relative_error(sparse, dense)
    report = UpcycleReport(len(result.mlps), len(result.converted), result.params_before,
                           count_parameters(result.model), active_parameters(result.model), error,
                           routing_rows(config, result.converted))
    return _print_report(report, f"{loaded.name}: upcycled", config, tolerance(dense.dtype),
                         str(dense.dtype)[6:])


def _print_report(report: UpcycleReport, title: str, config: UpcycleConfig, limit: float,
                  measured_in: str, written: Path | None = None) -> int:
    """The report table; CheckFailedError when a function-preserving conversion is off by more
    than `limit` (the tolerance of the dtype the error was `measured_in`)."""
    console.print(report_table(report, f"{title} ({routing_spec_text(config.routing)}, E={config.num_experts}, "
                                       f"k={config.top_k})"))
    error = report.max_relative_error
    if error is not None and preserves_function(config) and not error <= limit:
        where = f"; {written} was written but is wrong: delete it" if written else ""
        raise CheckFailedError(f"error {error:.2e} exceeds {limit:.1e} ({measured_in}): the model "
                               f"does not preserve the function{where}; please report it with the "
                               "model class")
    return 0


def _streams(source: Path) -> bool:
    """Whether the conversion can stream MODEL's safetensors shards."""
    from ..exporters.shards import SAFE_INDEX, SAFE_WEIGHTS

    return (source / SAFE_WEIGHTS).is_file() or (source / SAFE_INDEX).is_file()


def _rewrite_to_directory(args, source: Path, out: Path, config: UpcycleConfig,
                          dtype: torch.dtype | None, device: str) -> int:
    """`rewrite MODEL --out DIR`: stream the conversion (or convert in memory), then check it."""
    from ..exporters import save
    from ..exporters.streaming import convert_checkpoint

    max_bytes = shard_size(args.max_shard_size)
    options = dict(format=args.format, hf_target=args.hf_target, max_shard_size=max_bytes,
                   overwrite=args.overwrite)
    streams = _streams(source)
    start = time.perf_counter()
    args.outcome.target = out
    with progress_bars() as bars:
        options["progress"] = ProgressBars(bars)
        if streams:
            done = convert_checkpoint(source, out, config, **options, dtype=dtype, device=device)
            counts = (done.mlps, done.converted, done.params_before, done.params_after, done.active_params)
        else:  # no safetensors (e.g. pytorch_model.bin)
            loaded = load_pretrained(source, dtype=dtype, device=device)
            result = api.upcycle(loaded.model, config)
            options["max_shard_size"] = max_bytes or IN_MEMORY_SHARD_SIZE
            save(result.model.to("cpu"), out, **options)
            counts = (result.mlps, result.converted, result.params_before,
                      count_parameters(result.model), active_parameters(result.model))
    args.outcome.written = True
    how = "streamed" if streams else "converted in memory"
    console.print(f"[green]✓[/] wrote {out} ({args.format}, {how}, {time.perf_counter() - start:.1f} s)")
    mlps, converted = counts[:2]
    console.print(mlp_table(mlps, converted))
    check = None if args.no_check else check_written_model(source, out, args.format, device=device)
    report = UpcycleReport(len(mlps), len(converted), *counts[2:],
                           None if check is None else check.max_relative_error, routing_rows(config, converted))
    return _print_report(report, f"{source.name}: upcycled into {out} ({args.format})", config,
                         check.tolerance if check else 0.0, "float32, layer by layer", written=out)


# --------------------------------------------------------------------------- export-onnx


def cmd_export_onnx(args) -> int:
    """`export-onnx [MODEL] OUT.onnx`: upcycle MODEL, export it, report each MoE layer's lowering."""
    from ..exporters.onnx import export_onnx
    from ..exporters.onnx.errors import OnnxDtypeError
    from ..exporters.onnx.targets import get_target

    source = model_directory(args.model)
    out = check_onnx_output(source, args.out_onnx, args.overwrite)
    config = upcycle_config(args)
    dtype, target = output_dtype(args.dtype), get_target(args.target)
    weights = dtype or declared_dtype(source)
    if weights is not None and weights not in target.dtypes:
        given = f"--dtype {args.dtype}" if dtype else f"{source} holds {str(weights)[6:]} weights"
        raise OnnxDtypeError(f"{given}: onnxruntime's {target.name} execution provider cannot run "
                             f"{str(weights)[6:]}; use --dtype float32 or float16"
                             f"{' (or --target cuda)' if target.name == 'cpu' else ''}")
    with step("loading model"):
        loaded = load_pretrained(source, dtype=dtype)
    with step("capturing, matching and rewriting"):
        result = api.upcycle(loaded.model, config)
    console.print(mlp_table(result.mlps, result.converted))
    args.outcome.target = out
    with step(f"exporting to {out}"):
        path = export_onnx(result.model, out, args=loaded.sample.args, kwargs=loaded.sample.kwargs,
                           fused=not args.portable, target=args.target)
    args.outcome.written = True
    report = path.report
    console.print(onnx_table(report))
    console.print(f"wrote {path} (opset {report.opset}, IR version {report.ir_version}"
                  f"{', weights in external data' if report.external_data else ''})")
    return 0


# --------------------------------------------------------------------------- convert


def cmd_convert(args) -> int:
    """`convert NATIVE_DIR OUT --format hf`: an upcycle_fx checkpoint in a stock format."""
    import upcycle_fx

    native = Path(args.native)
    if not (native / NATIVE_MANIFEST).is_file():
        hint = (" it is a Hugging Face model: upcycle it with `upcycle-fx rewrite MODEL --out OUT`"
                if (native / "config.json").is_file() else "")
        raise ModelSourceError(f"{native} is not an upcycle_fx checkpoint (no {NATIVE_MANIFEST});"
                               f"{hint or ' give a directory written by rewrite --out or upcycle_fx.save'}")
    out = check_output_directory(native, args.out)
    max_bytes = shard_size(args.max_shard_size) or IN_MEMORY_SHARD_SIZE
    dtype = output_dtype(args.dtype)
    with step(f"loading {native}"):
        model = upcycle_fx.load(native).eval()
        if dtype is not None:
            model.to(dtype)
    args.outcome.target = out
    start = time.perf_counter()
    with progress_bars() as bars:
        upcycle_fx.save(model, out, format=args.format, hf_target=args.hf_target, max_shard_size=max_bytes,
                        overwrite=args.overwrite, progress=ProgressBars(bars))
    args.outcome.written = True
    checked = ", loaded back and checked against the input" if args.format == "hf" else ""
    console.print(f"[green]✓[/] wrote {out} ({args.format}{checked}, {time.perf_counter() - start:.1f} s)")
    return 0
