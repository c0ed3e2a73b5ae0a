"""The fuzz and fault campaign at a small fixed budget, plus checks that keep it honest.

`test_campaign_finds_no_failure` runs every stratum of every family at least once (hypothesis's
simplest draw first, fixed seed, no example database) and asserts that no trial is a silent wrong result, an
unnamed exception, NaN, a mutated input or lost data. Its failure message lists one two-line
reproducer per failure class. The larger campaign: `python benchmarks/fuzz_campaign.py`.
"""

from __future__ import annotations

import time

import pytest
import torch

import upcycle_fx
from upcycle_fx.testing.fuzz import (Category, CheckpointCase, DiskFaultCase, ModelSpec, RewriteCase,
                                     run_campaign)
from upcycle_fx.testing.fuzz.models import STYLES, activations_for
from upcycle_fx.testing.fuzz.oracle import Snapshot
from upcycle_fx.testing.fuzz.report import render
from upcycle_fx.testing.fuzz.repro import reproducer
from upcycle_fx.testing.fuzz.runner import SUITE_FAMILIES

IN_SUITE_BUDGET = 150  # every stratum at least once, the rewrite strata 2-3 times: about 20 s on CPU

EXPECTED_KIND = {"sequential": "dense", "dense": "dense", "gated": "gated", "fused_chunk": "fused_gated",
                 "fused_slice": "fused_gated", "functional": "dense", "inline": "dense", "bert_split": "dense"}


@pytest.mark.parametrize("style", STYLES)
def test_every_style_holds_the_ffns_it_claims(style):
    """Generators are honest: each model has one FFN per block, of the style's kind, and the plain
    model upcycles exactly (so a failure elsewhere is the twist's, not the generator's)."""
    spec = ModelSpec(style=style, act=activations_for(style)[0], layers=3)
    found = upcycle_fx.find_mlps(spec.build())
    assert [m.kind for m in found] == [EXPECTED_KIND[style]] * 3
    assert RewriteCase(spec, {"pattern": "all", "num_experts": 4}, example="none").run().category is Category.EXACT


def test_oracle_sees_a_mutation_and_a_wrong_model():
    """The oracle is not blind: an in-place rewrite is a mutation, a scaled FFN a silent wrong."""
    model = ModelSpec().build()
    before = Snapshot.of(model)
    upcycle_fx.rewrite(model, pattern="all", num_experts=2, inplace=True)
    assert before.differences(model)
    from upcycle_fx.testing.fuzz.oracle import compare_outputs

    x = torch.ones(2, 3)
    assert compare_outputs([x * 1.001], [x], preserves=True).category is Category.SILENT_WRONG
    assert compare_outputs([x * float("nan")], [x], preserves=True).category is Category.NAN


def test_reproducers_rerun_their_case():
    """A reproducer is code: evaluating it gives the same verdict."""
    for case in (RewriteCase(ModelSpec(style="gated", act="silu"), {"num_experts": float("inf")}),
                 CheckpointCase(ModelSpec(), "manifest_unknown_key"),
                 DiskFaultCase(ModelSpec(), "none")):
        expected = case.run().category
        namespace: dict = {}
        exec(reproducer(case).replace("print(", "result = ("), namespace)
        assert namespace["result"].category is expected


def test_campaign_finds_no_failure():
    """Exact or a named error in every trial: no silent wrong result, unnamed exception, NaN,
    mutated input or lost data (see the reproducers in the message)."""
    start = time.perf_counter()
    campaign = run_campaign(budget=IN_SUITE_BUDGET, seed=0, families=SUITE_FAMILIES)
    elapsed = time.perf_counter() - start
    assert len(campaign.trials) >= 120
    failures = campaign.failures()
    if failures:
        pytest.fail(f"{len(failures)} of {len(campaign.trials)} fuzz trials failed ({elapsed:.0f} s); one "
                    "reproducer per failure class:\n" + render(campaign), pytrace=False)
