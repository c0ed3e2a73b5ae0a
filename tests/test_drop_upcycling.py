"""Drop-Upcycling (arXiv 2502.19261): each expert re-draws its own random share r of hidden units
from the statistics of the original matrices; r = 0 is plain copies. Not function-preserving
for r > 0."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx import UpcycleConfig, UpcycleConfigError
from upcycle_fx.moe.expert_init import InitContext, drop_init
from upcycle_fx.moe.experts import Experts, FFNWeights
from upcycle_fx.passes.verify import preserves_function

from helpers import FUNCTION_TOLERANCE, build, max_error


def _ffn(d=32, f=64, gated=True, bias=True, seed=0) -> FFNWeights:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * f if gated else f
    return FFNWeights(torch.randn(rows, d, generator=g) * 0.5 + 0.3,
                      torch.randn(rows, generator=g) if bias else None,
                      torch.randn(d, f, generator=g) * 2.0 - 1.0, torch.randn(d, generator=g) if bias else None, gated)


def _dropped(ratio, gated=True, bias=True, num_experts=6, seed=0):
    ffn = _ffn(gated=gated, bias=bias)
    experts = Experts.tile(ffn, num_experts, activation=torch.nn.SiLU())
    config = UpcycleConfig(num_experts=num_experts, expert_init="drop", drop_ratio=ratio)
    drop_init(experts, InitContext(ffn, config, torch.Generator().manual_seed(seed)))
    return ffn, experts


def _changed_units(ffn: FFNWeights, experts: Experts, e: int) -> torch.Tensor:
    """Hidden units of expert e whose up rows, gate rows and down column all differ from the FFN's."""
    f = ffn.d_ff
    up = (experts.up_proj[e] != ffn.up).any(dim=1)
    up = up[:f] & up[f:] if ffn.gated else up
    down = (experts.down_proj[e] != ffn.down).any(dim=0)
    assert torch.equal(up, down)
    return up


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_each_expert_redraws_its_own_share_r_of_hidden_units(ratio, gated):
    ffn, experts = _dropped(ratio, gated=gated)
    masks = [_changed_units(ffn, experts, e) for e in range(experts.num_experts)]
    for e, mask in enumerate(masks):
        assert int(mask.sum()) == round(ratio * ffn.d_ff)
        kept = ~mask   # the other units are exact copies
        assert torch.equal(experts.down_proj[e][:, kept], ffn.down[:, kept])
    if ratio < 1.0:
        assert len({tuple(m.tolist()) for m in masks}) == len(masks)  # different units per expert
    torch.testing.assert_close(experts.down_bias, ffn.down_bias.expand_as(experts.down_bias), rtol=0, atol=0)


def test_redrawn_weights_match_the_original_matrices_statistics():
    """Re-drawn rows/columns follow N(mean, std) of the matrix they replace (gate and up halves
    each their own), not N(0, 1) or the other matrix's."""
    ffn, experts = _dropped(0.5, num_experts=16)
    f = ffn.d_ff
    gate_rows, up_rows, down_cols, bias = [], [], [], []
    for e in range(16):
        mask = _changed_units(ffn, experts, e)
        gate_rows.append(experts.up_proj[e, :f][mask])
        up_rows.append(experts.up_proj[e, f:][mask])
        down_cols.append(experts.down_proj[e][:, mask])
        bias.append(experts.up_bias[e, :f][mask])
    for drawn, original in [(gate_rows, ffn.up[:f]), (up_rows, ffn.up[f:]), (down_cols, ffn.down),
                            (bias, ffn.up_bias[:f])]:
        drawn = torch.cat([t.detach().reshape(-1) for t in drawn])
        assert abs(float(drawn.mean() - original.mean())) < 0.1 * float(original.std()) + 0.02
        assert abs(float(drawn.std() / original.std()) - 1) < 0.1


def test_ratio_zero_is_plain_copies_and_keeps_the_function():
    ffn, experts = _dropped(0.0)
    for e in range(experts.num_experts):
        assert torch.equal(experts.up_proj[e], ffn.up) and torch.equal(experts.down_proj[e], ffn.down)
    dense = build("hw-swiglu").eval()
    model = upcycle_fx.rewrite(dense, "all", num_experts=4, expert_init="drop", drop_ratio=0.0, seed=0)
    assert max_error(dense, model, "hw-swiglu") <= FUNCTION_TOLERANCE
    assert preserves_function(UpcycleConfig(expert_init="drop", drop_ratio=0.0))


def test_drop_is_not_function_preserving_and_is_reproducible():
    """r > 0 changes the function by design (the rewrite says so and skips the check); the same
    seed gives the same experts."""
    assert not preserves_function(UpcycleConfig(expert_init="drop"))
    dense = build("hw-swiglu").eval()
    result = upcycle_fx.upcycle(dense, UpcycleConfig(pattern="all", num_experts=4, expert_init="drop", seed=3))
    assert "changes the function by design" in result.unverified_reason
    assert max_error(dense, result.model, "hw-swiglu") > 1e-3
    again = upcycle_fx.rewrite(dense, "all", num_experts=4, expert_init="drop", seed=3)
    for (_, a), (_, b) in zip(upcycle_fx.moe_layers(result.model), upcycle_fx.moe_layers(again)):
        assert torch.equal(a.experts.up_proj, b.experts.up_proj)


def test_drop_composes_with_fine_grained_and_shared_experts():
    """Each fine-grained expert re-draws r of its own d_ff/G units; the shared experts stay copies."""
    dense = build("hw-swiglu").eval()
    model = upcycle_fx.rewrite(dense, "all", num_experts=6, top_k=3, granularity=4, num_shared_experts=1,
                               expert_init="drop", drop_ratio=0.5, seed=0)
    copy = upcycle_fx.rewrite(dense, "all", num_experts=6, top_k=3, granularity=4, num_shared_experts=1, seed=0)
    for (_, a), (_, b) in zip(upcycle_fx.moe_layers(model), upcycle_fx.moe_layers(copy)):
        width = a.experts.d_ff
        changed = (a.experts.down_proj != b.experts.down_proj).any(dim=1).sum(dim=-1)
        assert changed.tolist() == [round(0.5 * width)] * 6
        assert torch.equal(a.shared.experts.up_proj, b.shared.experts.up_proj)


@pytest.mark.parametrize("kwargs, match", [
    (dict(drop_ratio=0.5), "only applies to expert_init='drop'"),
    (dict(expert_init="drop", drop_ratio=1.5), r"must be in \[0, 1\]"),
    (dict(expert_init="drop", drop_ratio=float("nan")), "drop_ratio=nan"),
])
def test_bad_drop_settings_are_named(kwargs, match):
    with pytest.raises(UpcycleConfigError, match=match):
        UpcycleConfig(**kwargs)
