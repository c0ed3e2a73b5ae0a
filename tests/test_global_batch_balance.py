"""The load-balancing loss over the global batch ("Demons in the detail", arXiv 2501.11873):
f_e counts the expert loads of every micro-batch (and every data-parallel rank) of an optimizer
step so far, P_e keeps the gradient of this micro-batch; the optimizer step starts a new batch.

What holds exactly (float64 references, 1e-6 relative in float32): at micro-batch m the loss is
E · Σ_e f_e(micro-batches 1..m) · P_e(micro-batch m), so the last micro-batch sees the global
batch's f; the step's statistic E · Σ f_e · P_e over all micro-batches equals the loss of the
concatenated batch; across ranks the loss of one micro-batch is that of all ranks' tokens at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import upcycle_fx
from upcycle_fx.moe import MoE, MoESettings, Router, losses
from upcycle_fx.moe.experts import Experts

TOLERANCE = 1e-6
E = 6


def make_moe(**settings) -> MoE:
    g = torch.Generator().manual_seed(0)
    experts = Experts(E, 16, 24, gated=False, activation=torch.nn.ReLU(), activation_name="relu",
                      up_bias=False, down_bias=False)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    settings.setdefault("aux_loss_weight", 1.0)
    return MoE(Router(16, E, init_std=1.0, generator=g), experts, MoESettings(**settings)).train()


def micro_batches(sizes=(7, 12, 5)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 16, generator=g) for n in sizes]


def reference_loss(moe: MoE, counted: list[torch.Tensor], current: torch.Tensor) -> torch.Tensor:
    """E · Σ f_e · P_e in float64: f over the `counted` tokens, P over `current`."""
    with torch.no_grad():
        f = losses.balance_totals(moe.route(moe.router(torch.cat(counted))))[:E]
        f = f / f.sum()
        p = moe.route(moe.router(current)).probs.double().mean(0)
    return E * (f * p).sum()


def test_each_micro_batch_counts_the_loads_of_the_step_so_far():
    moe = make_moe(balance_scope="global_batch")
    seen = []
    for x in micro_batches():
        seen.append(x)
        moe(x)
        expected = reference_loss(moe, seen, x)
        assert abs(float(moe.last_aux_loss.detach()) - float(expected)) <= TOLERANCE * float(expected)


def test_the_step_statistic_is_the_loss_of_the_concatenated_batch():
    moe = make_moe(balance_scope="global_batch")
    batches = micro_batches()
    for x in batches:
        moe(x)
    whole = torch.cat(batches)
    with torch.no_grad():
        expected = losses.load_balancing_loss(moe.route(moe.router(whole))).double()
    assert abs(float(moe.step_totals.global_balance_loss()) - float(expected)) <= TOLERANCE * float(expected)
    assert abs(float(reference_loss(moe, batches, whole)) - float(expected)) <= TOLERANCE * float(expected)
    upcycle_fx.after_optimizer_step(moe)
    assert moe.step_totals.balance is None
    assert float(moe.step_totals.last_step_balance_loss) == pytest.approx(float(expected), rel=TOLERANCE)


def test_the_gradient_flows_through_this_micro_batch_only():
    """d loss_m / d router = that of E · Σ f(1..m) · P_m with f constant (float64 autograd ref)."""
    moe = make_moe(balance_scope="global_batch")
    first, second = micro_batches((9, 11))
    moe(first)
    moe(second)
    (grad,) = torch.autograd.grad(moe.last_aux_loss, moe.router.weight)
    with torch.no_grad():
        counts = losses.balance_totals(moe.route(moe.router(torch.cat([first, second]))))[:E]
    weight = moe.router.weight.detach().double().requires_grad_()
    probs = torch.softmax(second.double() @ weight.t(), dim=-1).mean(0)
    (expected,) = torch.autograd.grad(E * (counts / counts.sum() * probs).sum(), weight)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-5, atol=1e-7)


def test_an_optimizer_step_starts_a_new_global_batch():
    moe = make_moe(balance_scope="global_batch")
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.0)
    first, second = micro_batches((9, 11))
    moe(first).sum().backward()
    optimizer.step()  # the step hook ends the global batch
    moe(second)
    expected = reference_loss(moe, [second], second)
    assert abs(float(moe.last_aux_loss.detach()) - float(expected)) <= TOLERANCE * float(expected)


def test_micro_batch_scope_and_eval_forwards_count_nothing_across_batches():
    moe = make_moe()  # balance_scope="micro_batch"
    first, second = micro_batches((9, 11))
    moe(first)
    moe(second)
    assert abs(float(moe.last_aux_loss) - float(reference_loss(moe, [second], second))) <= 1e-6 * 2
    assert moe.step_totals.balance is None
    scoped = make_moe(balance_scope="global_batch").eval()
    with torch.no_grad():
        scoped(first)
        scoped(second)
    assert scoped.step_totals.balance is None


# --------------------------------------------------------------------------- the Trainer


def test_trainer_with_accumulation_resets_the_global_batch_each_step(tmp_path):
    """Trainer, 2 micro-batches per step: the totals of the first micro-batch are there when the
    second runs, gone after the optimizer step, and the step's global loss reaches the logs."""
    transformers = pytest.importorskip("transformers")
    from test_hf_workflow import TokenDataset, llama, train

    model = upcycle_fx.rewrite(llama(), num_experts=4, seed=0, balance_scope="global_batch",
                               scoring="sigmoid", balancing="bias")
    layer = upcycle_fx.moe_layers(model)[0][1]
    seen = {"substep": [], "step": []}

    class Probe(transformers.TrainerCallback):
        def on_substep_end(self, args, state, control, **kwargs):
            seen["substep"].append(float(layer.step_totals.balance[-1]))  # tokens counted so far

        def on_step_end(self, args, state, control, **kwargs):
            seen["step"].append(layer.step_totals.balance)
            seen.setdefault("finished", []).append(float(layer.step_totals.last_step_balance_loss))

    trainer = train(model, tmp_path, steps=2, accumulation=2, callbacks=[Probe(), upcycle_fx.MoECallback()])
    tokens_per_micro_batch = 2 * TokenDataset().ids.shape[1]
    assert seen["substep"] == [tokens_per_micro_batch] * 2
    assert seen["step"] == [None, None]
    name = upcycle_fx.moe_layers(model)[0][0]
    logged = [e[f"moe/{name}/global_balance_loss"] for e in trainer.state.log_history if "loss" in e]
    assert logged == pytest.approx(seen["finished"], rel=1e-6)
    assert trainer.state.log_history[0][f"moe/{name}/bias_spread"] > 0


# --------------------------------------------------------------------------- data parallel


@pytest.fixture(scope="module")
def balance_ranks(tmp_path_factory) -> Path:
    from distributed_cases import BALANCE_CASES
    from test_distributed import torchrun

    out = tmp_path_factory.mktemp("balance_ranks")
    torchrun(2, out, "--cases", ",".join(BALANCE_CASES))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp_global_bias", "ep_global_batch"])
def test_two_ranks_with_accumulation_train_like_one_process(balance_ranks, name):
    """2 gloo ranks x 2 micro-batches, global-batch scope (and sigmoid + bias balancing): the same
    losses, aux losses, loads, first-step gradients, parameters and biases after 3 steps as one
    process whose micro-batch m holds both ranks' m-th micro-batches (float32, 1e-5)."""
    from test_distributed import assert_matches_single_process, load, reference

    run, ref = load(balance_ranks, name), reference(name, 2)
    assert_matches_single_process(run, ref)
    assert run["biases"] == ref["biases"]
    if name == "fsdp_global_bias":
        assert any(b != 0 for layer in ref["biases"] for b in layer)


def test_activation_checkpointing_gives_the_same_gradient_bias_and_statistic():
    """A checkpointed layer runs its forward again in backward and counts its micro-batch twice;
    every count is doubled alike, so f_e, the gradient, the bias update and the step statistic
    are those of the run without checkpointing (compared exactly)."""
    pytest.importorskip("transformers")
    from test_routing_options import ids, llama

    def run(checkpointing: bool):
        model = upcycle_fx.rewrite(llama(), num_experts=4, seed=0, router_init_std=0.5,
                                   expert_noise_std=0.1, balance_scope="global_batch", scoring="sigmoid",
                                   balancing="bias", aux_loss_weight=1.0, verify=False).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for seed in (1, 2):
            tokens = ids(seed=seed)
            model(input_ids=tokens, labels=tokens).loss.backward()
        moe = upcycle_fx.moe_layers(model)[0][1]
        grad = moe.router.weight.grad.clone()
        torch.optim.SGD(model.parameters(), lr=0.0).step()
        return grad, moe.expert_bias.clone(), float(moe.step_totals.last_step_balance_loss)

    plain, checkpointed = run(False), run(True)
    assert torch.equal(plain[0], checkpointed[0]) and torch.equal(plain[1], checkpointed[1])
    assert plain[2] == checkpointed[2]
