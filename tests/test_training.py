"""Upcycled models train: finite gradients everywhere, the aux loss sums, the loss falls."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx.testing.zoo import ZOO

from helpers import build


def _lm_loss(model, inputs):
    """`outputs.loss` of a transformers model: in training mode it already holds the aux losses."""
    out = model(**inputs, labels=inputs["input_ids"])
    return out.loss


@pytest.mark.parametrize("routing", ["top_k", "expert_choice"])
@pytest.mark.parametrize("name", ["llama", "gpt2", "phi3"])
def test_gradients_reach_every_expert_and_router(name, routing):
    """backward(outputs.loss), which holds the aux losses, gives finite grads to all expert and router parameters,
    non-zero for every router (it learns through the routing weights)."""
    model = upcycle_fx.rewrite(build(name), routing=routing, z_loss_weight=1e-3, seed=0).train()
    inputs = ZOO[name].inputs(4, 16)
    loss = _lm_loss(model, inputs)
    loss.backward()
    for path, moe in upcycle_fx.moe_layers(model):
        for pname, param in moe.named_parameters():
            assert param.grad is not None, f"{path}.{pname} has no grad"
            assert torch.isfinite(param.grad).all(), f"{path}.{pname}"
        assert moe.router.weight.grad.abs().sum() > 0


def test_aux_loss_is_the_weighted_sum_of_the_layers():
    """aux_loss(model) = sum of each MoE's weighted load-balancing + z-loss of the last forward."""
    model = upcycle_fx.rewrite(build("llama"), aux_loss_weight=0.01, z_loss_weight=0.001, seed=0)
    assert float(upcycle_fx.aux_loss(model)) == 0.0  # nothing recorded before a forward
    model(**ZOO["llama"].inputs(2, 8))
    layers = [m for _, m in upcycle_fx.moe_layers(model)]
    total = upcycle_fx.aux_loss(model).detach()
    assert torch.allclose(total, sum(m.last_aux_loss.detach() for m in layers))
    # balance loss >= 1 (1.0 is perfect balance), so the total is at least 0.01 per layer
    assert total.item() >= 0.01 * len(layers)
    for m in layers:
        assert int(m.last_expert_load.sum()) == 2 * 8 * 2  # T * k assignments, none dropped
        assert int(m.last_dropped) == 0


def test_capacity_factor_drops_and_counts_tokens():
    """With a small capacity some assignments are dropped, counted, and the model still runs."""
    model = upcycle_fx.rewrite(build("llama"), capacity_factor=0.5, router_init_std=1.0, seed=0)
    model(**ZOO["llama"].inputs(2, 16))
    for _, moe in upcycle_fx.moe_layers(model):
        capacity = -(-0.5 * 32 * 2 // 8)
        assert int(moe.last_expert_load.max()) <= capacity
        assert int(moe.last_dropped) == 64 - int(moe.last_expert_load.sum()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "hw-swiglu"])
def test_training_lowers_the_loss(name):
    """A few AdamW steps on a fixed batch reduce LM loss + aux loss."""
    torch.manual_seed(0)
    model = upcycle_fx.rewrite(build(name), num_experts=4, seed=0).train()
    inputs = ZOO[name].inputs(4, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_fn():
        if ZOO[name].requires == "transformers":
            return _lm_loss(model, inputs)
        logits = model(**inputs)[:, :-1].flatten(0, 1)  # hand-written models return logits
        task = torch.nn.functional.cross_entropy(logits, inputs["input_ids"][:, 1:].flatten())
        return task + upcycle_fx.aux_loss(model)

    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
