"""The streaming conversion converts every Hugging Face family the in-memory rewrite converts,
including those whose stored tensor names differ from the runtime ones (GPT-NeoX `embed_out`,
ViT `encoder.layer.N.attention.query`): transformers' own key mapping is applied."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx import UpcycleConfig
from upcycle_fx.exporters.state import tensor_table
from upcycle_fx.testing.zoo import ZOO

from helpers import run

HF_FAMILIES = [name for name, entry in ZOO.items() if entry.requires == "transformers"]


@pytest.mark.parametrize("name", HF_FAMILIES)
def test_streamed_native_equals_in_memory_rewrite(name, tmp_path):
    """save_pretrained -> convert_checkpoint(format="native") -> load gives the in-memory
    rewrite of the same model bit for bit: every tensor, and the outputs."""
    dense = ZOO[name].build()
    dense.save_pretrained(tmp_path / "dense")
    config = UpcycleConfig(num_experts=2, top_k=2, router_init_std=1.0, seed=0)
    upcycle_fx.convert_checkpoint(tmp_path / "dense", tmp_path / "out", config, format="native")
    streamed = upcycle_fx.load(tmp_path / "out").eval()
    in_memory = upcycle_fx.upcycle(dense, config).model.eval()
    ours, theirs = tensor_table(streamed).tensors, tensor_table(in_memory).tensors
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    inputs = ZOO[name].inputs(2, 6)
    assert torch.equal(run(streamed, inputs), run(in_memory, inputs))
