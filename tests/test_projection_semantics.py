"""Only FFNs whose modules are exactly what the MoE copies are converted; the others are near
misses with the reason, and weights used outside their FFN stop the rewrite."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import upcycle_fx
from upcycle_fx.errors import NoMLPFoundError, RewriteError


class ScaledLinear(nn.Linear):
    """A projection whose own forward does more than F.linear (like LoRA or scaling wrappers)."""

    def forward(self, x):
        return super().forward(x) * 2.0


class SpelledOutLinear(nn.Linear):
    """Overrides forward but computes F.linear exactly (like Falcon's FalconLinear)."""

    def forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class Double(nn.Module):
    def forward(self, w):
        return 2 * w


def _mlp(first=nn.Linear):
    torch.manual_seed(0)
    return nn.Sequential(first(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


def _hooked(index, kind):
    model = _mlp()
    if kind == "forward":
        model[index].register_forward_hook(lambda m, i, o: o * 3)
    elif kind == "pre":
        model[index].register_forward_pre_hook(lambda m, i: (i[0] * 3,))
    else:
        model[index].register_full_backward_hook(lambda m, gi, go: None)
    return model


def _patched_forward():
    model = _mlp()
    original = model[0].forward
    model[0].forward = lambda x: original(x) * 3
    return model


def _parametrized(how):
    model = _mlp()
    if how == "parametrize":
        parametrize.register_parametrization(model[0], "weight", Double())
    elif how == "spectral_norm":
        parametrizations.spectral_norm(model[0])
    else:
        parametrizations.weight_norm(model[2])
    return model


REJECTED = {
    "subclass forward": (lambda: _mlp(ScaledLinear), "ScaledLinear overrides forward"),
    "forward hook": (lambda: _hooked(0, "forward"), "forward hook on 0"),
    "pre-hook": (lambda: _hooked(2, "pre"), "forward pre-hook on 2"),
    "backward hook": (lambda: _hooked(0, "backward"), "backward hook on 0"),
    "activation hook": (lambda: _hooked(1, "forward"), "forward hook on 1"),
    "patched forward": (_patched_forward, "forward replaced on the instance"),
    "parametrize": (lambda: _parametrized("parametrize"), "parametrized weight on 0"),
    "spectral_norm": (lambda: _parametrized("spectral_norm"), "parametrized weight on 0"),
    "weight_norm": (lambda: _parametrized("weight_norm"), "parametrized weight on 2"),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_ffn_with_more_than_plain_modules_is_a_near_miss(case):
    """find_mlps reports it as a near miss with the reason; rewrite raises instead of returning a
    model that silently lost the behaviour (it did: relative errors up to 0.9)."""
    build, reason = REJECTED[case]
    model = build()
    found = upcycle_fx.find_mlps(model)
    assert len(found) == 0
    assert any(reason in miss.reason for miss in found.near_misses), found.near_misses
    with pytest.raises(NoMLPFoundError, match=reason):
        upcycle_fx.rewrite(model, "all", num_experts=4, top_k=2)


def test_global_module_hook_is_a_near_miss():
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        found = upcycle_fx.find_mlps(_mlp())
    finally:
        handle.remove()
    assert len(found) == 0
    assert any("global module forward hook" in miss.reason for miss in found.near_misses)
    assert len(upcycle_fx.find_mlps(_mlp())) == 1


def test_forward_override_that_computes_f_linear_is_accepted_by_probe():
    """A subclass whose forward is F.linear spelled out converts, exactly."""
    dense = _mlp(SpelledOutLinear)
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, example_inputs=torch.randn(5, 16))
    x = torch.randn(7, 16)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


def test_probe_on_the_meta_device_uses_a_stand_in():
    with torch.device("meta"):
        plain, scaled = _mlp(SpelledOutLinear), _mlp(ScaledLinear)
    assert len(upcycle_fx.find_mlps(plain)) == 1
    assert len(upcycle_fx.find_mlps(scaled)) == 0


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x):
        return x + self.mlp(x)


def test_hook_on_the_module_the_moe_replaces_is_a_rewrite_error():
    model = nn.Sequential(Block(), Block()).eval()
    model[1].mlp.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(RewriteError, match=r"the MoE replaces 1.mlp, but: forward hook on 1.mlp"):
        upcycle_fx.rewrite(model, "all")
    assert isinstance(upcycle_fx.rewrite(model, [0])[0].mlp, upcycle_fx.MoE)


class TiedInCode(Block):
    """Reads the FFN's first weight in another branch: a tie written in code."""

    def forward(self, x):
        return x + self.mlp(x) + (x @ self.mlp[0].weight.T).sum(-1, keepdim=True)


class TiedParameter(Block):
    """Another module shares the FFN's first weight."""

    def __init__(self):
        super().__init__()
        self.probe = nn.Linear(16, 32)
        self.probe.weight = self.mlp[0].weight

    def forward(self, x):
        return x + self.mlp(x) + self.probe(x).sum(-1, keepdim=True)


@pytest.mark.parametrize("block, use", [(TiedInCode, "mlp.0.weight is read outside the FFN"),
                                        (TiedParameter, "mlp.0.weight is the same parameter as 1.probe.weight")])
def test_ffn_weights_used_elsewhere_stop_the_rewrite(block, use):
    """Before: the weight was swapped away and the first forward raised AttributeError (or the
    other use kept the stale dense weight). Now: RewriteError naming the use, model untouched."""
    model = nn.Sequential(block(), block()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = upcycle_fx.find_mlps(model)
    assert any(use in str(u) for u in found[1].outside_uses), found[1].outside_uses
    with pytest.raises(RewriteError, match="also used outside it"):
        upcycle_fx.rewrite(model, "all")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(b.mlp, nn.Sequential) for b in model)


def test_plain_functional_ffn_has_no_outside_uses():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = nn.Parameter(torch.randn(32, 16)), nn.Parameter(torch.randn(16, 32))

        def forward(self, x):
            return x + F.linear(F.relu(F.linear(x, self.w1)), self.w2)

    found = upcycle_fx.find_mlps(nn.Sequential(Functional(), Functional()))
    assert len(found) == 2 and all(m.outside_uses == () for m in found)


class BatchNormBlock(Block):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(16)

    def forward(self, x):
        return super().forward(self.norm(x))


@pytest.mark.parametrize("example", [True, False])
def test_find_mlps_leaves_buffers_alone_in_training_mode(example):
    """Capture runs the model (example forward, shadow values); in training mode that used to
    update BatchNorm statistics and spectral-norm power iterations of the user's model."""
    model = nn.Sequential(BatchNormBlock(), BatchNormBlock()).train()
    parametrizations.spectral_norm(model[1].mlp[2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    upcycle_fx.find_mlps(model, example_inputs=(torch.randn(6, 16),) if example else None)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed == []
