"""The fast dispatch paths agree with the loop oracle and compile into one graph."""

from __future__ import annotations

import pytest
import torch

from upcycle_fx.moe import MoE, MoESettings, Router
from upcycle_fx.moe.dispatch import dispatch
from upcycle_fx.moe.experts import Experts, FFNWeights
from upcycle_fx.moe.routing import expert_choice_routing, top_k_routing


def _experts(d=16, f=24, num_experts=6, gated=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * f if gated else f
    weights = FFNWeights(torch.randn(rows, d, generator=g), torch.randn(rows, generator=g) if bias else None,
                         torch.randn(d, f, generator=g), torch.randn(d, generator=g) if bias else None, gated)
    return Experts.tile(weights, num_experts, activation=torch.nn.SiLU(), noise_std=0.3, generator=g)


ROUTINGS = {
    "expert_choice": lambda logits: expert_choice_routing(logits, 2.0),
    "top_k_capacity": lambda logits: top_k_routing(logits, 2, normalize=True, capacity_factor=0.75),
    "top_k_dropless": lambda logits: top_k_routing(logits, 2, normalize=False),
}


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("routing_name", ROUTINGS)
def test_auto_path_equals_loop_forward_and_backward(routing_name, gated):
    """auto (batched for capacity routings, grouped otherwise) == loop, values and gradients."""
    experts = _experts(gated=gated)
    x = torch.randn(11, 16, requires_grad=True)
    logits = torch.randn(11, 6, requires_grad=True)
    results = {}
    for impl in ("auto", "loop"):
        routing = ROUTINGS[routing_name](logits)
        out = dispatch(x, routing, experts, impl)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                    [x, logits, experts.up_proj, experts.down_proj, experts.up_bias])
        results[impl] = (out, grads)
    torch.testing.assert_close(results["auto"][0], results["loop"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["auto"][1], results["loop"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_capacity_slots_hold_exactly_the_kept_assignments():
    """The [E, C] slot table lists each kept (token, expert, weight) once; empty slots weigh 0."""
    logits = torch.randn(20, 4)
    routing = top_k_routing(logits, 2, normalize=True, capacity_factor=0.5)
    capacity = routing.slots.token.shape[1]
    assert capacity == 5  # ceil(0.5 * 20 * 2 / 4)
    kept = {(int(t), int(e), round(float(w), 6)) for t, e, w, k in zip(
        routing.token_idx, routing.expert_idx, routing.weight, routing.kept) if k}
    in_slots = {(int(t), e, round(float(w), 6)) for e in range(4)
                for t, w in zip(routing.slots.token[e], routing.slots.weight[e]) if w != 0}
    assert in_slots == kept
    assert int((routing.slots.weight != 0).sum()) == int(routing.kept.sum())


def test_batched_needs_slots():
    experts = _experts()
    routing = top_k_routing(torch.randn(4, 6), 2, normalize=True)
    with pytest.raises(ValueError, match="capacity routing"):
        dispatch(torch.randn(4, 16), routing, experts, "batched")


@pytest.mark.parametrize("settings", [MoESettings(), MoESettings(capacity_factor=1.0),
                                      MoESettings(routing="expert_choice")], ids=["dropless", "capacity", "ec"])
def test_moe_compiles_into_one_graph(settings):
    """torch.compile(fullgraph=True) captures the whole bf16 MoE layer (no graph break, so no
    host read-back) for every routing; compiled output equals eager. (bf16 is the training
    path; grouped_mm's compile-time checks take bf16 only.)"""
    torch._dynamo.reset()
    moe = MoE(Router(16, 6, init_std=1.0), _experts(), settings).to(torch.bfloat16)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)
    compiled = torch.compile(moe, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), moe(x), rtol=2e-2, atol=2e-2)
    assert moe.last_expert_load is not None and moe.last_aux_loss is not None


def test_unaligned_sizes_are_padded_exactly():
    """d_model=6, d_ff=10 (not multiples of 4 floats): grouped path pads and matches the loop."""
    experts = _experts(d=6, f=10)
    x = torch.randn(9, 6)
    routing = top_k_routing(torch.randn(9, 6), 2, normalize=True)
    torch.testing.assert_close(dispatch(x, routing, experts, "grouped"),
                               dispatch(x, routing, experts, "loop"), rtol=1e-5, atol=1e-5)
