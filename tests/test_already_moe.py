"""Inputs that are already Mixture-of-Experts models are refused before capture, with what
they are and what to do: stock HF MoE models, our own `format="hf"` output, models holding
`upcycle_fx.MoE` layers."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx import AlreadyMoEError
from upcycle_fx.capture import tracer

from helpers import build

transformers = pytest.importorskip("transformers")

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
STOCK_MOE = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4), "num_local_experts=4"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, moe_intermediate_size=32, shared_expert_intermediate_size=64),
                  "num_experts=4"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(num_experts=4, moe_intermediate_size=32),
                  "experts=4"),
}


@pytest.fixture
def no_tracing(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an MoE model was traced before it was refused")

    monkeypatch.setattr(tracer.CaptureTracer, "trace", forbidden)


def _stock(name: str) -> torch.nn.Module:
    config_cls, model_cls, extra, _ = STOCK_MOE[name]
    config = getattr(transformers, config_cls)(**_TINY, **extra)
    return getattr(transformers, model_cls)(config).eval()


@pytest.mark.parametrize("function", ["rewrite", "find_mlps"])
@pytest.mark.parametrize("name", list(STOCK_MOE))
def test_stock_moe_models_are_refused_before_capture(name, function, no_tracing):
    """Mixtral used to fail inside the tracer, Qwen2-MoE to turn its shared expert into an MoE
    inside the MoE: now a named error with the expert count, the MoE blocks and the way out."""
    model = _stock(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AlreadyMoEError) as info:
        getattr(upcycle_fx, function)(model)
    message = str(info.value)
    assert type(model).__name__ in message and STOCK_MOE[name][3] in message
    assert "model.layers.0.mlp" in message and "SparseMoeBlock" in message
    assert "Upcycle the dense model it came from" in message
    assert isinstance(info.value, upcycle_fx.UpcycleError)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_an_upcycled_model_is_refused(request):
    """Upcycling twice would renumber FFNs under MoE layers that record their index."""
    sparse = upcycle_fx.rewrite(build("llama"))
    request.getfixturevalue("no_tracing")
    with pytest.raises(AlreadyMoEError, match=r"LlamaForCausalLM .*model.layers.1.mlp \(MoE\)"):
        upcycle_fx.rewrite(sparse, "all")
    with pytest.raises(AlreadyMoEError, match=r"is already a Mixture-of-Experts model .*<model> \(MoE\)"):
        upcycle_fx.rewrite(upcycle_fx.moe_layers(sparse)[0][1])


def test_our_own_hf_output_is_refused(tmp_path):
    """`save(format="hf")` writes Qwen2-MoE; loaded back with transformers it is an MoE model."""
    sparse = upcycle_fx.rewrite(build("llama"))
    upcycle_fx.save(sparse, tmp_path / "hf", format="hf")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    with pytest.raises(AlreadyMoEError, match=r"Qwen2MoeForCausalLM .*config.num_experts=8"):
        upcycle_fx.rewrite(loaded)
