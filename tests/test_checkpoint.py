"""Native checkpoints: `upcycle_fx.save` / `upcycle_fx.load` give back the same model, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import fx

import upcycle_fx
from upcycle_fx.passes.splice import is_spliced
from upcycle_fx import CheckpointError, CheckpointMismatchError, MoE
from upcycle_fx.exporters.state import tensor_table
from upcycle_fx.moe import MoESettings
from upcycle_fx.testing.zoo import ZOO

from helpers import SIZES, build, run


def _upcycled(name: str, pattern="every_other_mlp", **kwargs) -> torch.nn.Module:
    return upcycle_fx.rewrite(build(name), pattern, num_experts=4, top_k=2, router_init_std=1.0, seed=0,
                              **kwargs).eval()


def _assert_same_model(saved: torch.nn.Module, loaded: torch.nn.Module, name: str) -> None:
    """Same module classes, the same tensors (values, dtypes, ties) and bit-identical outputs."""
    classes = lambda model: [(n, type(m).__qualname__) for n, m in model.named_modules()]  # noqa: E731
    assert classes(saved) == classes(loaded)
    a, b = tensor_table(saved), tensor_table(loaded)
    assert list(a.tensors) == list(b.tensors) and a.aliases == b.aliases
    for key, tensor in a.tensors.items():
        assert tensor.dtype == b.tensors[key].dtype and torch.equal(tensor, b.tensors[key]), key
    for batch, seq in SIZES:
        inputs = ZOO[name].inputs(batch, seq)
        assert torch.equal(run(loaded, inputs), run(saved, inputs))


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5", "phi3", "opt"])
def test_hf_model_round_trip_from_config_alone(name, tmp_path):
    """Llama (gated), GPT-2 (Conv1D, folded c_proj), BERT (split FFN), T5 (encoder-decoder, three
    tied embeddings), Phi-3 (fused gate_up), OPT (inline FFN: spliced graph): `load(dir)` without
    a skeleton gives the same model, outputs bit-identical."""
    model = _upcycled(name)
    upcycle_fx.save(model, tmp_path / "ckpt")
    loaded = upcycle_fx.load(tmp_path / "ckpt")
    assert type(loaded) is type(model)
    _assert_same_model(model, loaded, name)
    for alias, canonical in tensor_table(model).aliases.items():  # ties are one Parameter again
        assert loaded.get_parameter(alias) is loaded.get_parameter(canonical)


@pytest.mark.parametrize("name", ["hw-swiglu", "hw-functional", "hw-sigmoid-gated", "hw-sequential"])
def test_handwritten_model_round_trip_with_skeleton(name, tmp_path):
    """A plain nn.Module comes back from its dense skeleton (other random weights), which is left
    untouched."""
    model = _upcycled(name, "all")
    upcycle_fx.save(model, tmp_path / "ckpt")
    torch.manual_seed(123)
    skeleton = type(build(name))()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    loaded = upcycle_fx.load(tmp_path / "ckpt", skeleton)
    _assert_same_model(model, loaded, name)
    assert all(torch.equal(v, before[k]) for k, v in skeleton.state_dict().items())
    assert not upcycle_fx.moe_layers(skeleton)


def test_skeleton_on_the_meta_device(tmp_path):
    """A skeleton built without data (no memory, no initialisation) is enough: every tensor,
    buffers included, comes from the checkpoint."""
    model = _upcycled("hw-squared-relu")
    upcycle_fx.save(model, tmp_path / "ckpt")
    with torch.device("meta"):
        skeleton = type(build("hw-squared-relu"))()
    loaded = upcycle_fx.load(tmp_path / "ckpt", skeleton)
    assert {t.device.type for t in loaded.parameters()} == {"cpu"}
    _assert_same_model(model, loaded, "hw-squared-relu")


def test_spliced_inline_ffn_round_trip(tmp_path):
    """FFNs written inline in a block come back as the same spliced block, bit-identical in
    eval and (same seed) in training mode, where the spliced functional dropout is active."""
    from test_splice import InlineBlock, _stack

    model = upcycle_fx.rewrite(_stack(InlineBlock), router_init_std=1.0, seed=0)
    upcycle_fx.save(model, tmp_path / "ckpt")
    loaded = upcycle_fx.load(tmp_path / "ckpt", _stack(InlineBlock))
    assert is_spliced(loaded[1]) and isinstance(loaded[1].moe_0, MoE)
    x = torch.randn(3, 5, 16)
    assert torch.equal(loaded(x), model(x))
    model.train(), loaded.train()
    torch.manual_seed(7)
    expected = model(x)
    torch.manual_seed(7)
    assert torch.equal(loaded(x), expected)


def test_bfloat16_sharded_round_trip(tmp_path):
    """dtypes are kept, small shards give an index, and the result is still bit-identical."""
    model = _upcycled("llama").to(torch.bfloat16)
    upcycle_fx.save(model, tmp_path / "ckpt", max_shard_size=100_000)
    files = sorted(p.name for p in (tmp_path / "ckpt").glob("*.safetensors"))
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(files) > 3 and set(index["weight_map"].values()) == set(files)
    loaded = upcycle_fx.load(tmp_path / "ckpt")
    assert loaded.model.layers[1].mlp.experts.up_proj.dtype == torch.bfloat16
    _assert_same_model(model, loaded, "llama")


def test_manifest_describes_the_rewrite(tmp_path):
    """upcycle_fx.json names the converted FFNs, their MoE settings, folded modules and versions;
    the safetensors hold every tensor once (tied weights once)."""
    model = _upcycled("gpt2", normalize_weights=False, aux_loss_weight=0.02)
    upcycle_fx.save(model, tmp_path / "ckpt")
    manifest = json.loads((tmp_path / "ckpt" / "upcycle_fx.json").read_text())
    assert [(r["path"], r["mlp_index"], r["num_experts"]) for r in manifest["moe_layers"]] == [
        ("transformer.h.1.mlp.c_fc", 1, 4), ("transformer.h.3.mlp.c_fc", 3, 4)]
    assert manifest["moe_layers"][0]["settings"] == {
        "top_k": 2, "routing": "top_k", "capacity_factor": None, "normalize_weights": False,
        "aux_loss_weight": 0.02, "z_loss_weight": 0.0, "granularity": 1, "num_shared_experts": 0,
        "shared_expert_gate": False, "scoring": "softmax", "balancing": "loss",
        "bias_update_speed": 0.001, "balance_scope": "micro_batch", "routed_scaling_factor": 1.0,
        "weight_scaling": False}
    assert manifest["folded"] == {"transformer.h.1.mlp.act": "transformer.h.1.mlp.c_fc",
                                  "transformer.h.1.mlp.c_proj": "transformer.h.1.mlp.c_fc",
                                  "transformer.h.3.mlp.act": "transformer.h.3.mlp.c_fc",
                                  "transformer.h.3.mlp.c_proj": "transformer.h.3.mlp.c_fc"}
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    assert {"upcycle_fx", "torch", "transformers", "safetensors"} <= set(manifest["versions"])
    assert manifest["hf_config"]["model_type"] == "gpt2"
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" not in keys and "transformer.h.1.mlp.c_fc.experts.up_proj" in keys


def test_per_layer_settings_modes_and_dispatch_are_restored(tmp_path):
    """What the rewrite cannot know (a layer's settings changed afterwards, its dispatch, modules in
    another train/eval mode than the root) comes back from the manifest."""
    model = _upcycled("llama")
    moe = model.model.layers[3].mlp
    moe.settings = MoESettings(top_k=1, normalize_weights=False, capacity_factor=1.5)
    moe.dispatch_impl = "loop"
    model.model.layers[1].train()
    upcycle_fx.save(model, tmp_path / "ckpt")
    loaded = upcycle_fx.load(tmp_path / "ckpt")
    assert loaded.model.layers[3].mlp.settings == moe.settings
    assert loaded.model.layers[3].mlp.dispatch_impl == "loop"
    assert [m.training for m in loaded.modules()] == [m.training for m in model.modules()]
    model.eval(), loaded.eval()
    _assert_same_model(model, loaded, "llama")


def test_layer_with_its_own_expert_count(tmp_path):
    """A layer whose experts were replaced after the rewrite (2 instead of 4) comes back as saved."""
    from upcycle_fx.moe import Router
    from upcycle_fx.moe.experts import Experts

    model = _upcycled("llama")
    moe = model.model.layers[3].mlp
    e = moe.experts
    moe.experts = Experts(2, e.d_model, e.d_ff, gated=True, activation=e.activation, activation_name="silu",
                          up_bias=False, down_bias=False)
    torch.nn.init.normal_(moe.experts.up_proj, std=0.1), torch.nn.init.normal_(moe.experts.down_proj, std=0.1)
    moe.router = Router(e.d_model, 2)
    upcycle_fx.save(model, tmp_path / "ckpt")
    loaded = upcycle_fx.load(tmp_path / "ckpt")
    assert loaded.model.layers[3].mlp.num_experts == 2 and loaded.model.layers[1].mlp.num_experts == 4
    _assert_same_model(model, loaded, "llama")


def test_save_reads_the_model_only(tmp_path):
    """Saving changes neither tensors nor MoE statistics of the model."""
    model = _upcycled("llama")
    run(model, ZOO["llama"].inputs(2, 8))
    moe = model.model.layers[1].mlp
    load, state = moe.last_expert_load.clone(), {k: v.clone() for k, v in model.state_dict().items()}
    upcycle_fx.save(model, tmp_path / "ckpt")
    assert torch.equal(moe.last_expert_load, load)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_wrong_skeleton_is_a_named_error(tmp_path):
    """A skeleton with another FFN, or none for a non-HF model: errors that say what to pass."""
    upcycle_fx.save(_upcycled("hw-swiglu"), tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatchError, match="rewriting the skeleton does not give the saved model"):
        upcycle_fx.load(tmp_path / "ckpt", build("hw-bias-free"))
    with pytest.raises(CheckpointError, match="pass its dense skeleton"):
        upcycle_fx.load(tmp_path / "ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"\(32, 64, True, 'silu', False, False\), saved \(32, 96"):
        upcycle_fx.load(tmp_path / "ckpt", type(build("hw-swiglu"))(d_ff=64))
    with pytest.raises(CheckpointMismatchError, match=r"of another shape: embed\.weight: file \(128, 32\), model \(64, 32\)"):
        upcycle_fx.load(tmp_path / "ckpt", type(build("hw-swiglu"))(vocab_size=64))


def test_model_without_data_is_refused(tmp_path):
    with torch.device("meta"):
        model = type(build("hw-swiglu"))()
    with pytest.raises(CheckpointError, match="meta device"):
        upcycle_fx.save(upcycle_fx.rewrite(model, verify=False), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
