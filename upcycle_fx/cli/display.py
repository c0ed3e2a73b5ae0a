"""What the command line prints: step timings, the FFN table, the report, progress bars."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..report import UpcycleReport

console = Console(soft_wrap=True)   # long paths stay on one line, whole

# Test hook: seconds to sleep after each written shard, so a test can interrupt a conversion
# while it writes. Unset in normal use.
SHARD_DELAY_ENV = "UPCYCLE_FX_TEST_SHARD_DELAY"


@contextmanager
def step(what: str):
    """A spinner while `what` runs, then its duration."""
    start = time.perf_counter()
    with console.status(f"{what}..."):
        yield
    console.print(f"[green]✓[/] {what} ({time.perf_counter() - start:.1f} s)")


MODULE_WIDTH = 40   # the module column is at least this wide (or as wide as its longest path)
SHORT_WIDTH = 16    # other columns of the decision table: at least as wide as their text, up to this
CONVERT = {"selected": "yes", "not selected": "no", "rejected": "rejected"}


def mlp_table(mlps, selected=(), routing: dict[int, str] | None = None) -> Table:
    """The FFNs found; `routing`: FFN index -> routing of the converted ones (a column)."""
    chosen = {m.index for m in selected}
    table = Table(title=f"{len(mlps)} FFNs found")
    columns = ("#", "module", "kind", "activation", "d_model", "d_ff", "convert") + (("routing",) if routing else ())
    for column in columns:
        table.add_column(column, overflow="fold")
    for m in mlps:
        row = [str(m.index), m.path or "<model>", m.kind, m.activation, str(m.d_model), str(m.d_ff),
               "yes" if m.index in chosen else ""]
        table.add_row(*row, *((routing.get(m.index, ""),) if routing else ()))
    return table


def decision_table(mlps, routing: dict[int, str] | None = None) -> Table:
    """Every candidate (`MLPList.decisions`): convert yes / no / rejected, and why in a few words
    (the full reasons: `decision_notes`); `routing`: FFN index -> routing of the selected ones."""
    rejected = sum(d.status == "rejected" for d in mlps.decisions)
    table = Table(title=f"{len(mlps)} FFNs found, {rejected} candidate(s) rejected")
    columns = ("#", "module", "kind", "activation", "d_model", "d_ff", "convert", "why")
    rows = []
    for d in mlps.decisions:
        m = d.match
        sizes = (str(m.d_model), str(m.d_ff)) if m is not None else ("", "")
        row = ["-" if m is None else str(m.index), d.where, d.kind, d.activation, *sizes,
               CONVERT[d.status], d.note or "see below"]
        if routing:
            row.append(routing.get(d.index, "") if d.status == "selected" else "")
        rows.append(row)
    for i, column in enumerate(columns + (("routing",) if routing else ())):
        # short columns never wrap; module paths stay whole where they fit
        widest = max([len(column)] + [len(row[i]) for row in rows])
        table.add_column(column, overflow="fold",
                         min_width=min(widest, MODULE_WIDTH if column == "module" else SHORT_WIDTH))
    for row in rows:
        table.add_row(*row)
    return table


def decision_notes(mlps) -> list[str]:
    """The lines printed under the decision table: the pattern's rule once, each rejection in full."""
    rules = list(dict.fromkeys(d.reason.split(";")[0] for d in mlps.decisions if d.status != "rejected"))
    lines = [f"[dim]{rule}[/]" for rule in rules[:1] if not rule.startswith("pattern [")]
    lines += [f"[yellow]rejected[/] {d.where}: {d.reason}" for d in mlps.decisions if d.status == "rejected"]
    return lines


def report_table(report: UpcycleReport, title: str) -> Table:
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    for key, value in report.rows():
        table.add_row(key, value)
    return table


def onnx_table(report) -> Table:
    """Each MoE layer of an ONNX export (exporters.onnx.ExportReport): fused or portable, and why."""
    table = Table(title=f"ONNX: {len(report.fused)} of {len(report.layers)} MoE layers fused "
                        f"(target {report.target})")
    for column in ("MoE layer", "lowering", "node form / reason"):
        table.add_column(column, overflow="fold")
    for layer in report.layers:
        table.add_row(layer.name, layer.lowering, layer.detail)
    return table


def progress_bars() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)


class ProgressBars:
    """Checkpoint-writing progress (exporters.shards.Progress) as two rich bars."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.tensors = self.shards = None
        self.delay = float(os.environ.get(SHARD_DELAY_ENV, "0") or 0)

    def start(self, tensors: int, shards: int, nbytes: int) -> None:
        self.tensors = self.bars.add_task(f"tensors ({nbytes / 1e9:.2f} GB)", total=tensors)
        self.shards = self.bars.add_task("shards", total=shards)

    def tensor(self, name: str, nbytes: int) -> None:
        self.bars.advance(self.tensors)

    def shard(self, filename: str) -> None:
        self.bars.advance(self.shards)
        if self.delay:
            time.sleep(self.delay)
