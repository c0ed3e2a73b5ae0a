"""Bad input gets a named error that says what, where and what to try; nothing is changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import upcycle_fx
from upcycle_fx import (CaptureError, NoMLPFoundError, NoMLPSelectedError, RewriteError,
                        UpcycleConfigError)

from helpers import build


class MLP(nn.Module):
    def __init__(self, d=8, f=16):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, f), nn.GELU(), nn.Linear(f, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("kwargs, words", [
    (dict(top_k=9, num_experts=8), ["top_k=9", "num_experts=8"]),
    (dict(num_experts=0), ["num_experts=0", ">= 1"]),
    (dict(top_k=0), ["top_k=0"]),
    (dict(capacity_factor=0.0), ["capacity_factor=0.0", "> 0"]),
    (dict(capacity_factor=-1.0), ["capacity_factor=-1.0"]),
    (dict(routing="switch"), ["routing='switch'", "top_k", "expert_choice"]),
    (dict(pattern="every_third_mlp"), ["every_third_mlp", "every_other_mlp"]),
    (dict(pattern=[1, -2]), ["indices", "-2"]),
    (dict(router_init_std=-0.1), ["router_init_std"]),
])
def test_bad_arguments_raise_config_errors(kwargs, words):
    """Each out-of-range argument is named in an UpcycleConfigError (a ValueError)."""
    model = build("hw-swiglu")
    with pytest.raises(UpcycleConfigError) as info:
        upcycle_fx.rewrite(model, **kwargs)
    assert isinstance(info.value, ValueError)
    for word in words:
        assert word in str(info.value)


def test_index_out_of_range_says_how_many_ffns_exist():
    with pytest.raises(UpcycleConfigError, match=r"out of range: the model has 4 FFNs"):
        upcycle_fx.rewrite(build("hw-swiglu"), [1, 7])


def test_model_without_ffn():
    """No FFN: NoMLPFoundError naming the model class and what to try."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8))
    with pytest.raises(NoMLPFoundError, match=r"(?s)Sequential: no FFN .*example_inputs="):
        upcycle_fx.rewrite(model)


def test_model_with_only_a_tanh_head_explains_the_rejection():
    """A Linear -> tanh -> Linear head is not an FFN, and the error says why."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
    with pytest.raises(NoMLPFoundError, match=r"'tanh' is not an FFN activation"):
        upcycle_fx.rewrite(model, "all")


def test_nothing_selected():
    """A lone MLP is block 0 of no stack: every_other_mlp selects nothing and says so."""
    with pytest.raises(NoMLPSelectedError, match=r"selected none of the 1 FFNs.*pattern='all'"):
        upcycle_fx.rewrite(MLP())


def test_a_bare_mlp_becomes_an_moe():
    """The model itself is the FFN: pattern='all' returns an MoE computing the same function."""
    dense = MLP()
    moe = upcycle_fx.rewrite(dense, "all", router_init_std=1.0)
    assert isinstance(moe, upcycle_fx.MoE)
    x = torch.randn(5, 8)
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-6)


class DataDependent(nn.Module):
    """An FFN whose forward branches on the data: plain FX cannot trace it."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP()

    def forward(self, x):
        h = self.mlp.down(self.mlp.act(self.mlp.up(x)))
        if h.abs().max() > 1e6:
            h = h.clamp(-1e6, 1e6)
        return x + h


def test_uncapturable_module_raises_capture_error_with_a_hint():
    """Without example inputs the data-dependent branch cannot be traced: CaptureError names
    the module and suggests example_inputs=; the model is untouched."""
    model = DataDependent()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CaptureError, match=r"DataDependent: .*pass example_inputs="):
        upcycle_fx.rewrite(model, "all")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_example_inputs_make_it_capturable():
    """With example_inputs the branch is specialised, the FFN found and converted exactly."""
    model = DataDependent()
    x = torch.randn(3, 8)
    sparse = upcycle_fx.rewrite(model, "all", example_inputs=(x,), router_init_std=1.0)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert any("bool(" in s for s in found.capture.regions[0].specializations)


class ModeDependentInline(nn.Module):
    """An inline FFN in a block whose forward branches on self.training (not just dropout)."""

    def __init__(self, d=8, f=16):
        super().__init__()
        self.up, self.down = nn.Linear(d, f), nn.Linear(f, d)

    def forward(self, x):
        if self.training:
            x = x * 0.5
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_inline_ffn_in_mode_dependent_code_is_refused():
    """Splicing would freeze `if self.training:`: RewriteError naming the module."""
    model = nn.Sequential(*[ModeDependentInline() for _ in range(2)]).eval()
    with pytest.raises(RewriteError, match=r"^1: its forward depends on self.training"):
        upcycle_fx.rewrite(model)


class _SharedFFNBlock(nn.Module):
    """A block calling an FFN module that another block calls too (tied weights)."""

    def __init__(self, mlp: nn.Module, split: bool):
        super().__init__()
        self.mlp, self.split = mlp, split

    def forward(self, x):
        if self.split:  # iterating over a tensor's rows: the model does not trace whole
            x = torch.stack([row for row in x])
        return x + self.mlp(x)


class _TiedFFNModel(nn.Module):
    def __init__(self, split: bool):
        super().__init__()
        shared = MLP()
        self.blocks = nn.ModuleList([_SharedFFNBlock(shared, split), _SharedFFNBlock(shared, split),
                                     _SharedFFNBlock(MLP(), split)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_shared_ffn_module_is_refused_when_its_calls_fall_in_different_regions():
    """Captured region by region, the FFN called by two blocks is a near miss in each region (one
    MoE for both calls needs both calls in one graph); only the unshared FFN is converted. (In
    one whole-model graph it becomes one shared MoE: tests/test_ffn_forms.py.)"""
    model = _TiedFFNModel(split=True)
    x = torch.randn(2, 5, 8)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert [p for p, _ in found.capture_failures][:1] == [""]
    assert [m.paths for m in found] == [("blocks.2.mlp.up", "blocks.2.mlp.down")]
    assert any("called 2 times (shared weights)" in miss.reason for miss in found.near_misses)
    sparse = upcycle_fx.rewrite(model, "all", example_inputs=(x,))
    assert [name for name, _ in upcycle_fx.moe_layers(sparse)] == ["blocks.2.mlp"]
    assert sparse.blocks[0].mlp is sparse.blocks[1].mlp  # still tied
