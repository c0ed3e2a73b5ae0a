"""Expert initialisation is a registry: a new method is one function and one registration."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx import UpcycleConfig, UpcycleConfigError
from upcycle_fx.moe import expert_init as registry
from upcycle_fx.passes.verify import preserves_function

from helpers import FUNCTION_TOLERANCE, build, max_error


@pytest.fixture
def scaled_method():
    """Registers 'halved_down' (every expert's down projection halved) for one test."""
    def halved_down(experts, context):
        with torch.no_grad():
            experts.down_proj.mul_(0.5)

    registry.register_expert_init("halved_down", halved_down, preserves_function=False)
    yield "halved_down"
    del registry._REGISTRY["halved_down"]


def test_the_built_in_methods_are_registered():
    assert {"copy", "random", "drop"} <= set(registry.expert_init_names())


def test_a_registered_method_is_accepted_and_run_by_the_rewrite(scaled_method):
    dense = build("hw-swiglu").eval()
    assert UpcycleConfig(expert_init=scaled_method).expert_init == scaled_method
    assert not preserves_function(UpcycleConfig(expert_init=scaled_method))
    copies = upcycle_fx.rewrite(dense, "all", num_experts=4, seed=0)
    halved = upcycle_fx.rewrite(dense, "all", num_experts=4, seed=0, expert_init=scaled_method)
    for (_, a), (_, b) in zip(upcycle_fx.moe_layers(halved), upcycle_fx.moe_layers(copies)):
        torch.testing.assert_close(a.experts.down_proj, b.experts.down_proj * 0.5, rtol=0, atol=0)
    assert max_error(dense, halved, "hw-swiglu") > 0.1


def test_a_method_that_claims_to_preserve_the_function_is_checked(monkeypatch):
    """preserves_function=True makes the rewrite verify the result: a method that breaks the
    function anyway is a named RewriteError, not a silently wrong model."""
    def broken(experts, context):
        with torch.no_grad():
            experts.down_proj.mul_(0.5)

    monkeypatch.setitem(registry._REGISTRY, "broken", registry.ExpertInit("broken", broken, lambda c: True))
    with pytest.raises(upcycle_fx.RewriteError):
        upcycle_fx.rewrite(build("hw-swiglu"), "all", num_experts=4, seed=0, expert_init="broken")


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(UpcycleConfigError, match=r"expert_init='zeros' is unknown.*'copy', 'random', 'drop'"):
        UpcycleConfig(expert_init="zeros")


@pytest.mark.parametrize("name, fn", [("not an identifier", lambda e, c: None), ("fine", "not callable")])
def test_registration_checks_its_arguments(name, fn):
    with pytest.raises(UpcycleConfigError, match="register_expert_init"):
        registry.register_expert_init(name, fn)


def test_copy_keeps_the_function_through_the_registry():
    dense = build("hw-swiglu").eval()
    model = upcycle_fx.rewrite(dense, "all", num_experts=4, expert_init="copy", seed=0)
    assert max_error(dense, model, "hw-swiglu") <= FUNCTION_TOLERANCE


def test_random_redraws_every_matrix_from_its_own_std():
    dense = build("hw-swiglu").eval()
    model = upcycle_fx.rewrite(dense, "all", num_experts=4, expert_init="random", seed=0)
    copies = upcycle_fx.rewrite(dense, "all", num_experts=4, seed=0)
    for (_, a), (_, b) in zip(upcycle_fx.moe_layers(model), upcycle_fx.moe_layers(copies)):
        assert not torch.equal(a.experts.up_proj, b.experts.up_proj)
        assert abs(float(a.experts.up_proj.detach().std() / b.experts.up_proj.detach().std()) - 1) < 0.1
