"""Numerical edge cases: empty capacity slots, extreme inputs, float64 exactness, capacity size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import upcycle_fx
from upcycle_fx.moe import Experts, FFNWeights, MoE, MoESettings, Router, dispatch, top_k_routing
from upcycle_fx.report import relative_error

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _experts(num_experts=4, d=8, f=16, dtype=torch.float32):
    torch.manual_seed(0)
    weights = FFNWeights(torch.randn(f, d, dtype=dtype) / 3, torch.randn(f, dtype=dtype) / 3,
                         torch.randn(d, f, dtype=dtype) / 4, torch.randn(d, dtype=dtype) / 4, gated=False)
    return Experts.tile(weights, num_experts, activation=nn.ReLU(), activation_name="relu")


def _reference(x, routing, experts):
    """Σ over kept assignments of w · expert_e(x_t), in float64, one assignment at a time."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t, e, w, kept in zip(routing.token_idx, routing.expert_idx, routing.weight, routing.kept):
        if kept:
            out[t] += float(w) * experts.forward_expert(int(e), x[t:t + 1]).double()[0]
    return out


def _overflowing_expert_3(everywhere: bool) -> Experts:
    """Expert 3 overflows to inf on every input, or only where x[0] > 0."""
    experts = _experts()
    with torch.no_grad():
        experts.up_proj[3].zero_()
        experts.up_proj[3][:, 0] = 1e30
        experts.up_bias[3].fill_(1e30 if everywhere else 0.0)
        experts.down_proj[3].fill_(1e30)
    return experts


@pytest.mark.parametrize("device", DEVICES)
def test_empty_slots_of_an_overflowing_expert_add_nothing(device):
    """Expert 3 takes no token: its empty capacity slots point at token 0 with weight 0.
    Before: 0 · inf made token 0 NaN."""
    experts = _overflowing_expert_3(everywhere=True)
    x = torch.randn(6, 8)
    logits = torch.randn(6, 4)
    logits[:, 3] = -50.0
    routing = top_k_routing(logits, 2, normalize=True, capacity_factor=1.0)
    assert not routing.slots.filled[3].any()
    with torch.no_grad():
        on_device = top_k_routing(logits.to(device), 2, normalize=True, capacity_factor=1.0)
        out = dispatch(x.to(device), on_device, experts.to(device), "auto").cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _reference(x, routing, experts.cpu()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["batched", "grouped", "loop"])
def test_dropped_assignments_add_nothing(impl, device):
    """Tokens 0 and 1 fill expert 3 (finite there); token 2's assignment to it is dropped, and
    expert 3 overflows on token 2. Before: grouped and loop added 0 · inf to token 2."""
    experts = _overflowing_expert_3(everywhere=False)
    x = torch.randn(6, 8)
    x[:, 0] = torch.tensor([-1.0, -1.0, 1.0, -1.0, -1.0, -1.0])
    logits = torch.zeros(6, 4)
    logits[0:2, 3] = 50.0
    logits[2, 0], logits[2, 3] = 50.0, 40.0
    routing = top_k_routing(logits, 2, normalize=True, capacity_factor=0.5)
    dropped = (routing.expert_idx == 3) & (routing.token_idx == 2)
    assert dropped.any() and not routing.kept[dropped].any()
    with torch.no_grad():
        on_device = top_k_routing(logits.to(device), 2, normalize=True, capacity_factor=0.5)
        out = dispatch(x.to(device), on_device, experts.to(device), impl).cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _reference(x, routing, experts.cpu()), rtol=1e-5, atol=1e-6)


def test_empty_slots_give_finite_gradients():
    experts = _overflowing_expert_3(everywhere=True)
    logits = torch.randn(6, 4, requires_grad=True)
    masked = logits + torch.tensor([0.0, 0.0, 0.0, -50.0])
    x = torch.randn(6, 8, requires_grad=True)
    routing = top_k_routing(masked, 1, normalize=False, capacity_factor=1.0)
    dispatch(x, routing, experts, "batched").square().sum().backward()
    grads = [x.grad, logits.grad, *(p.grad for p in experts.parameters())]
    assert all(torch.isfinite(g).all() for g in grads)


def _dense_ffn(dtype):
    """ReLU FFN whose up weights are all positive: hugely negative inputs give a finite output
    (the down bias) while the router's float32 logits of such inputs overflow to ±inf."""
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        ffn[0].weight.abs_()
    return ffn.to(dtype).eval()


@pytest.mark.parametrize("dtype, scales", [(torch.bfloat16, (1e4, 1e10, 1e20, 1e30, 1e38)),
                                           (torch.float16, (1e2, 1e3, 1e4, 6e4))])
@pytest.mark.parametrize("routing", ["top_k", "expert_choice"])
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_inputs_stay_finite_where_the_dense_ffn_is(dtype, scales, routing, device):
    dense = _dense_ffn(dtype).to(device)
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, routing=routing,
                                router_init_std=1.0, verify=False)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for scale in scales:
        signs = torch.where(torch.rand(4, 16, generator=generator) < 0.5, -1.0, 1.0)
        rows += [-scale * torch.ones(2, 16), scale * signs]
    x = torch.cat(rows).to(dtype).to(device)
    with torch.no_grad():
        want, got = dense(x), sparse(x)
        logits = upcycle_fx.moe_layers(sparse)[0][1].router(x)
    assert torch.isfinite(logits).all()
    finite = torch.isfinite(want).all(-1)
    assert finite.sum() >= 2 * len(scales)  # the all-negative rows at least
    assert torch.isfinite(got[finite]).all()
    if routing == "top_k":
        assert relative_error(got[finite], want[finite]) <= 1e-2


def test_router_clamps_non_finite_logits():
    router = Router(4, 3, init_std=1.0)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4, [0.0] * 4]))
    x = torch.tensor([[3e38] * 4, [float("nan")] * 4], dtype=torch.float32)
    logits = router(x)
    assert torch.isfinite(logits).all()
    assert logits[0, 0] > 0 > logits[0, 1]


@pytest.mark.parametrize("top_k", [2, 4])
def test_float64_model_is_preserved_to_1e_12(top_k):
    """Routing weights are computed in float64 for float64 models (in float32 they summed to 1
    only to 6e-8, and a float64 model failed its own verification)."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).double().eval()
    x = torch.randn(32, 16, dtype=torch.float64)
    result = upcycle_fx.upcycle(dense, upcycle_fx.UpcycleConfig(
        pattern="all", num_experts=8, top_k=top_k, router_init_std=1.0), example_inputs=(x,))
    assert result.verified_error is not None and result.verified_error <= 1e-12
    with torch.no_grad():
        assert relative_error(result.model(x * 3), dense(x * 3)) <= 1e-12


def test_top_k_capacity_never_exceeds_the_number_of_tokens():
    """capacity_factor=20000 on 16 tokens: at most 16 slots per expert (was 80 000: 1.6 GB)."""
    routing = top_k_routing(torch.randn(16, 8), 2, normalize=True, capacity_factor=20000.0)
    assert routing.slots.token.shape == (8, 16)
    assert bool(routing.kept.all())
    moe = MoE(Router(8, 8), _experts(num_experts=8), MoESettings(top_k=2, capacity_factor=20000.0))
    x = torch.randn(16, 8)
    reference = MoE(moe.router, moe.experts, MoESettings(top_k=2))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), reference(x), rtol=1e-5, atol=1e-6)


def test_router_weight_follows_the_model_dtype_and_computes_in_float32():
    """The router's weight is stored in the model's dtype (`model.to(bfloat16)` casts it, as the
    stock Hugging Face MoE formats expect); its logits are float32 whatever that dtype."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16)).eval()
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, router_init_std=1.0).to(torch.bfloat16)
    dense = dense.to(torch.bfloat16)
    router = upcycle_fx.moe_layers(sparse)[0][1].router
    x = torch.randn(10, 16).to(torch.bfloat16)
    with torch.no_grad():
        assert router.weight.dtype == torch.bfloat16 and router(x).dtype == torch.float32
        assert relative_error(sparse(x), dense(x)) <= 2e-2
