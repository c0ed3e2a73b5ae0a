"""Every recipe on every architecture of the test zoo: fine-grained experts beside a gated shared
expert with sigmoid scores and bias balancing keep the dense function at conversion; Drop-Upcycling
and softmax-then-top-k with weight scaling run and train; the saved model loads back bit for bit."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx import UpcycleConfig
from upcycle_fx.report import first_tensor
from tests.helpers import FUNCTION_TOLERANCE, ZOO_NAMES, build, max_error
from upcycle_fx.testing.zoo import ZOO

PRESERVING = dict(pattern="all", num_experts=4, top_k=2, granularity=2, num_shared_experts=1,
                  shared_expert_gate=True, scoring="sigmoid", balancing="bias", seed=0)
CHANGING = {
    "drop": dict(pattern="all", num_experts=4, top_k=2, expert_init="drop", drop_ratio=0.5, seed=0),
    "scaled": dict(pattern="all", num_experts=4, top_k=2, normalize_weights=False, weight_scaling=True,
                   balance_scope="global_batch", seed=0),
}


pytestmark = pytest.mark.slow  # 75 conversions with save/load: about a minute


def _granularity_fits(model, granularity: int) -> bool:
    return all(m.d_ff % granularity == 0 for m in upcycle_fx.find_mlps(model))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_fine_grained_shared_sigmoid_bias_keeps_the_function(name, tmp_path):
    dense = build(name).eval()
    if not _granularity_fits(dense, 2):
        with pytest.raises(upcycle_fx.UpcycleConfigError, match="granularity"):
            upcycle_fx.upcycle(dense, UpcycleConfig(**PRESERVING))
        return
    result = upcycle_fx.upcycle(dense, UpcycleConfig(**PRESERVING))
    assert result.unverified_reason is None and result.verified_error <= FUNCTION_TOLERANCE
    sparse = result.model.eval()
    assert max_error(dense, sparse, name) <= FUNCTION_TOLERANCE
    assert all(moe.shared is not None and moe.settings.scoring == "sigmoid"
               for _, moe in upcycle_fx.moe_layers(sparse))
    upcycle_fx.save(sparse, tmp_path / "native")
    loaded = upcycle_fx.load(tmp_path / "native", None if hasattr(dense, "config") else build(name)).eval()
    inputs = ZOO[name].inputs(2, 8)
    with torch.no_grad():
        assert torch.equal(first_tensor(loaded(**inputs)), first_tensor(sparse(**inputs)))


@pytest.mark.parametrize("recipe", sorted(CHANGING))
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_recipes_that_change_the_function_run_and_train(name, recipe):
    dense = build(name)
    result = upcycle_fx.upcycle(dense, UpcycleConfig(**CHANGING[recipe]))
    assert result.unverified_reason is not None  # said plainly: not checked against the dense model
    sparse = result.model.train()
    out = first_tensor(sparse(**ZOO[name].inputs(2, 8)))
    assert bool(torch.isfinite(out).all())
    (out.float().square().mean() + upcycle_fx.aux_loss(sparse)).backward()
    routers = [moe.router.weight.grad for _, moe in upcycle_fx.moe_layers(sparse)]
    assert routers and all(g is not None and bool(torch.isfinite(g).all()) for g in routers)
