"""The campaign's report: a rich table of verdicts per family, then one reproducer per failure
class (category, family, kind), as text the test failure message and the command both print."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from .oracle import Category
from .runner import Campaign

SHORT = {Category.EXACT: "exact", Category.NAMED: "named", Category.SILENT_WRONG: "silent wrong",
         Category.UNNAMED: "unnamed", Category.NAN: "NaN", Category.MUTATED: "mutated",
         Category.LOST: "lost"}


def table(campaign: Campaign) -> Table:
    result = Table(title=f"upcycle_fx fuzz campaign: budget {campaign.budget}, seed {campaign.seed}")
    result.add_column("family")
    result.add_column("tried", justify="right")
    for category in Category:
        style = "red" if category.is_failure else "green"
        result.add_column(SHORT[category], justify="right", style=style)
    result.add_column("s", justify="right")
    for family in campaign.seconds:
        counts = campaign.counts(family)
        result.add_row(family, str(sum(counts.values())), *(str(counts[c]) for c in Category),
                       f"{campaign.seconds[family]:.0f}")
    totals = campaign.counts()
    result.add_row("total", str(sum(totals.values())), *(str(totals[c]) for c in Category),
                   f"{sum(campaign.seconds.values()):.0f}", style="bold")
    return result


def failure_classes(campaign: Campaign) -> str:
    """One block per failure class: verdict, detail and a two-line reproducer."""
    blocks = []
    for trial in campaign.first_failures():
        outcome = trial.outcome
        blocks.append(f"[{outcome.category.value}] {trial.family} / {trial.extra['kind']}: {outcome.detail}\n"
                      + "\n".join("    " + line for line in trial.reproducer.splitlines()))
    return "\n".join(blocks)


def render(campaign: Campaign, width: int = 140) -> str:
    """The whole report as plain text (table, then failure classes)."""
    console = Console(width=width, record=True, file=io.StringIO(), color_system=None)
    console.print(table(campaign))
    text = console.export_text()
    classes = failure_classes(campaign)
    if classes:
        text += f"\nFailure classes (first example of each, {len(campaign.first_failures())}):\n" + classes + "\n"
    return text
