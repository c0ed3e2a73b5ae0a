"""Capture: whole model where it traces, smallest regions otherwise, inputs from HF configs."""

from __future__ import annotations

import torch
from torch import nn

import upcycle_fx
from upcycle_fx.capture import capture, resolve_inputs
from upcycle_fx.testing.zoo import ZOO

from helpers import build


class Block(nn.Module):
    def __init__(self, d=16, f=48):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class UntraceableTop(nn.Module):
    """The top-level forward converts a tensor to a Python int: FX cannot trace it, even with
    shadow values; each block traces fine."""

    def __init__(self, n=4):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        repeats = int(x.abs().sum() > 0)  # data -> Python int
        for block in self.blocks:
            for _ in range(repeats):
                x = block(x)
        return x


def test_falls_back_to_the_blocks_with_example_inputs():
    """Whole-model tracing fails; each block is captured as a region; FFN paths are absolute."""
    model = UntraceableTop().eval()
    x = torch.randn(2, 5, 16)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert [r.prefix for r in found.capture.regions] == [f"blocks.{i}" for i in range(4)]
    assert found.capture_failures[0][0] == ""  # the whole model was tried first
    assert [(m.paths, m.stack, m.block) for m in found] == [
        ((f"blocks.{i}.mlp.0", f"blocks.{i}.mlp.2"), "blocks", i) for i in range(4)]
    sparse = upcycle_fx.rewrite(model, example_inputs=(x,), router_init_std=1.0)
    assert [n for n, _ in upcycle_fx.moe_layers(sparse)] == ["blocks.1.mlp", "blocks.3.mlp"]
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)


def test_without_inputs_the_error_says_to_pass_them():
    """No inputs and no whole-model trace: a CaptureError that names the model and the fix."""
    import pytest

    with pytest.raises(upcycle_fx.CaptureError, match=r"UntraceableTop: .*example_inputs="):
        upcycle_fx.find_mlps(UntraceableTop())


class Gate(nn.Module):
    """A module with data-dependent code that the default leaf policy does not know (and that
    mixes elements, so no element-wise probe takes it for an activation)."""

    def forward(self, x):
        return x + x.flip(-1) if bool(x.mean() > -100) else x


class GatedBlock(Block):
    def __init__(self):
        super().__init__()
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x) + self.mlp(self.norm(x))


def test_leaf_modules_hint_makes_a_model_capturable():
    """leaf_modules= (a class or a qualified name) keeps an untraceable module opaque."""
    import pytest

    model = nn.Sequential(GatedBlock(), GatedBlock()).eval()
    with pytest.raises(upcycle_fx.CaptureError):
        upcycle_fx.find_mlps(model)
    assert len(upcycle_fx.find_mlps(model, leaf_modules=(Gate,))) == 2
    assert len(upcycle_fx.find_mlps(model, leaf_modules=("0.gate", "1.gate"))) == 2
    sparse = upcycle_fx.rewrite(model, leaf_modules=(Gate,), router_init_std=1.0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-6)


def test_hf_models_get_inputs_from_their_config():
    """input_ids for LMs, pixel_values for ViT, plus decoder_input_ids for encoder-decoders;
    no KV cache and tuple outputs during capture."""
    llama, vit, t5 = build("llama"), build("vit"), build("t5")
    llama_inputs = resolve_inputs(llama)
    assert llama_inputs.kwargs["input_ids"].shape == (2, 8)
    assert int(llama_inputs.kwargs["input_ids"].max()) < llama.config.vocab_size
    assert llama_inputs.kwargs["use_cache"] is False and llama_inputs.kwargs["return_dict"] is False
    assert resolve_inputs(vit).kwargs["pixel_values"].shape == (2, 3, 32, 32)
    assert set(resolve_inputs(t5).kwargs) >= {"input_ids", "decoder_input_ids"}


def test_whole_hf_models_are_captured_in_one_graph():
    """Every Hugging Face zoo model traces whole (one region, no failures), with attention a leaf."""
    for name, entry in ZOO.items():
        if entry.requires != "transformers":
            continue
        captured = capture(build(name))
        assert len(captured.regions) == 1 and not captured.failures, name
        region = captured.regions[0]
        targets = [region.absolute(n.target) for n in region.graph.nodes if n.op == "call_module"]
        assert not any(".q_proj" in t or ".query" in t for t in targets), name  # inside leaves


def test_example_inputs_override_the_config_inputs():
    """User inputs (here longer sequences) are used instead of the generated ones."""
    model = build("gpt2")
    ids = torch.randint(0, 256, (1, 12))
    inputs = resolve_inputs(model, {"input_ids": ids})
    assert inputs.kwargs["input_ids"] is ids
    assert len(upcycle_fx.find_mlps(model, example_inputs={"input_ids": ids})) == 4
