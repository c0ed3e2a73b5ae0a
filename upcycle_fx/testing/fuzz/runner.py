"""The campaign: hypothesis draws cases from each family, the oracle judges each one.

Hypothesis is used as a generator only (no shrinking, no example database): every drawn case
runs and is recorded, so one campaign gives the full counts. Its random stream is fixed by the
seed, so a campaign is reproducible; every trial keeps a two-line reproducer.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from .arguments import ARGUMENT_NAMES, CONFIG_FIELDS, argument_cases, config_cases
from .checkpoints import CORRUPTIONS, checkpoint_cases
from .disk import FAULTS, SAVE_STRATA, disk_cases, save_argument_cases
from .models import TWISTS
from .numerics import STRATA as NUMERIC_STRATA
from .numerics import dispatch_cases, numerics_cases
from .onnx import STRATA as ONNX_STRATA
from .onnx import onnx_cases
from .oracle import Category, Trial
from .repro import reproducer
from .rewriting import model_cases


@dataclass(frozen=True)
class Family:
    """A kind of trial: its strata (each gets an equal part of the family's budget, at least one
    trial, so that a small budget still covers every twist, argument, corruption and fault), the
    case strategy of a stratum, and the family's share of the budget."""

    name: str
    strata: tuple[str, ...]
    strategy: Callable[[str], st.SearchStrategy]
    weight: float
    what: str
    in_suite: bool = True  # False: seconds per trial, command-line campaign only


FAMILIES = (
    Family("models", TWISTS, model_cases, 4.0, "random FFN styles, one twist each, through rewrite"),
    Family("arguments", ARGUMENT_NAMES, argument_cases, 2.0, "rewrite with one argument fuzzed"),
    Family("config", CONFIG_FIELDS, config_cases, 1.0, "UpcycleConfig with one field fuzzed"),
    Family("numerics", NUMERIC_STRATA, numerics_cases, 2.0, "bf16/fp16/fp32 extremes, capacity routings"),
    Family("dispatch", NUMERIC_STRATA, dispatch_cases, 1.0, "drifted experts: automatic dispatch vs the loop"),
    Family("checkpoints", tuple(CORRUPTIONS), checkpoint_cases, 2.0, "corrupted checkpoints through load"),
    Family("disk", FAULTS, disk_cases, 1.0, "disk faults during save (rename, ENOSPC, interrupt, read-only)"),
    Family("save_args", SAVE_STRATA, save_argument_cases, 1.0, "save/load with bad arguments"),
    Family("onnx", ONNX_STRATA, onnx_cases, 0.5, "export_onnx with bad arguments", in_suite=False),
)
SUITE_FAMILIES = tuple(f.name for f in FAMILIES if f.in_suite)


@dataclass
class Campaign:
    """Every trial of one run, and how long each family took."""

    trials: list[Trial] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    budget: int = 0
    seed: int = 0

    def failures(self) -> list[Trial]:
        return [t for t in self.trials if t.outcome.category.is_failure]

    def counts(self, family: str | None = None) -> dict[Category, int]:
        counts = {c: 0 for c in Category}
        for trial in self.trials:
            if family is None or trial.family == family:
                counts[trial.outcome.category] += 1
        return counts

    def first_failures(self) -> list[Trial]:
        """The first trial of each (category, family, kind): one reproducer per failure class."""
        seen: dict[tuple, Trial] = {}
        for trial in self.failures():
            seen.setdefault((trial.outcome.category.value, trial.family, trial.extra["kind"]), trial)
        return [seen[key] for key in sorted(seen)]


def shares(budget: int, families=FAMILIES) -> dict[str, int]:
    """The budget split over families by weight, at least one trial each."""
    total = sum(f.weight for f in families)
    return {f.name: max(1, round(budget * f.weight / total)) for f in families}


def run_stratum(family: Family, stratum: str, count: int, seed: int, sink: list[Trial],
                progress: Callable[[Trial], None] | None = None) -> None:
    """`count` cases of one stratum (the first is hypothesis's simplest draw)."""
    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False)
    @given(family.strategy(stratum))
    def trial(case) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = case.run()
        record = Trial(family.name, outcome, reproducer(case), {"kind": case.kind, "stratum": stratum})
        sink.append(record)
        if progress is not None:
            progress(record)

    hypothesis_seed(seed)(trial)()


def run_campaign(budget: int = 200, seed: int = 0, families: tuple[str, ...] | None = None,
                 progress: Callable[[Trial], None] | None = None) -> Campaign:
    """Run about `budget` trials spread over the families (all, or the named ones)."""
    chosen = [f for f in FAMILIES if families is None or f.name in families]
    unknown = set(families or ()) - {f.name for f in FAMILIES}
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; choose from {[f.name for f in FAMILIES]}")
    campaign = Campaign(budget=budget, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster and leaves the other cores alone
    try:
        for family in chosen:
            start = time.perf_counter()
            per_stratum = max(1, round(shares(budget, chosen)[family.name] / len(family.strata)))
            for stratum in family.strata:
                run_stratum(family, stratum, per_stratum, seed, campaign.trials, progress)
            campaign.seconds[family.name] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return campaign
