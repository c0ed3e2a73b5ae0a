"""Routing is a registry: a new scorer or balancer is one function and one registration, and
then works through the config, the layer, the losses, the checkpoint and the ONNX lowering."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx import UpcycleConfig, UpcycleConfigError
from upcycle_fx.moe import balancing, scoring
from upcycle_fx.report import relative_error

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture
def registered():
    """Registers a toy scorer (squared softplus) and a toy balancer for one test."""
    def squared_softplus(logits: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(logits).square()

    def halve_bias(moe, loads: torch.Tensor) -> None:
        moe.expert_bias.add_(torch.where(loads > loads.mean(), -0.5, 0.5).to(moe.expert_bias))

    upcycle_fx.register_scorer("squared_softplus", squared_softplus,
                               uniform=lambda num_experts: float(torch.nn.functional.softplus(
                                   torch.zeros(())).square()))
    upcycle_fx.register_balancer("toy_bias", uses_bias=True, step=halve_bias)
    yield
    del scoring.SCORERS["squared_softplus"]
    del balancing.BALANCERS["toy_bias"]


def llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config)


def test_a_registered_scorer_and_balancer_work_end_to_end(registered, tmp_path):
    dense = llama()
    model = upcycle_fx.rewrite(dense, num_experts=4, seed=0, scoring="squared_softplus",
                               balancing="toy_bias", bias_update_speed=1.0)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # renormalised weights: still the dense function
        error = relative_error(model.eval()(input_ids=ids).logits, dense(input_ids=ids).logits)
    assert error <= 1e-5
    moe = upcycle_fx.moe_layers(model)[0][1]
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert moe.router.weight.grad is not None and float(moe.last_aux_loss.detach()) > 0
    torch.optim.SGD(model.parameters(), lr=0.0).step()  # the toy balancer's step runs
    assert set(moe.expert_bias.abs().tolist()) == {0.5}
    upcycle_fx.save(model, tmp_path / "ckpt")
    loaded = upcycle_fx.load(tmp_path / "ckpt")
    loaded_moe = upcycle_fx.moe_layers(loaded)[0][1]
    assert loaded_moe.settings.scoring == "squared_softplus"
    assert torch.equal(loaded_moe.expert_bias, moe.expert_bias)


def test_weight_scaling_uses_the_scorers_uniform_score(registered):
    """E/k for softmax, 2/k for sigmoid, 1/(k·uniform) for a registered scorer."""
    from upcycle_fx.moe import MoESettings

    assert MoESettings(top_k=2, normalize_weights=False, weight_scaling=True).combine_scale(8) == 4.0
    assert MoESettings(top_k=2, normalize_weights=False, weight_scaling=True,
                       scoring="sigmoid").combine_scale(8) == 1.0
    softplus0 = float(torch.nn.functional.softplus(torch.zeros(())).square())
    scale = MoESettings(top_k=2, normalize_weights=False, weight_scaling=True,
                        scoring="squared_softplus", routed_scaling_factor=3.0).combine_scale(8)
    assert scale == pytest.approx(3.0 / (2 * softplus0))


def test_unknown_and_duplicate_names_are_named_errors(registered):
    with pytest.raises(UpcycleConfigError, match="registered scorers: .*'squared_softplus'"):
        UpcycleConfig(scoring="cubic")
    with pytest.raises(UpcycleConfigError, match="already registered"):
        upcycle_fx.register_scorer("softmax", torch.sigmoid, uniform=lambda e: 0.5)
    with pytest.raises(UpcycleConfigError, match="already registered"):
        upcycle_fx.register_balancer("bias")
    with pytest.raises(UpcycleConfigError, match="expert_choice routing lets experts choose"):
        UpcycleConfig(balancing="toy_bias", routing="expert_choice")
