"""bf16 / fp16 checkpoints keep their dtype in every output format, and configs say so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

import upcycle_fx
from upcycle_fx import UpcycleConfig
from upcycle_fx.exporters.errors import CheckpointError
from upcycle_fx.testing.zoo import _decoder_cfg

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

HALF = [torch.bfloat16, torch.float16]


def dense_dir(tmp_path: Path, dtype: torch.dtype, family: str = "Llama") -> Path:
    """A tiny dense causal LM saved in `dtype` by save_pretrained (config dtype included)."""
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**_decoder_cfg())
    model = getattr(transformers, f"{family}ForCausalLM")(config).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(tmp_path / "dense", max_shard_size="100KB")
    return tmp_path / "dense"


def stored_dtypes(directory: Path, skip=()) -> set[torch.dtype]:
    found = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            found |= {handle.get_tensor(k).dtype for k in handle.keys() if k not in skip}
    return found


def tensors_of(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in directory.glob("*.safetensors"):
        out.update(load_file(str(file)))
    return out


def name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_streamed_hf_output_keeps_the_dtype_and_says_so(dtype, tmp_path):
    """`rewrite DIR --out OUT --format hf` of a half-precision checkpoint: half-precision
    tensors, config dtype / torch_dtype naming it, and from_pretrained(dtype="auto") in it."""
    source = dense_dir(tmp_path, dtype)
    upcycle_fx.convert_checkpoint(source, tmp_path / "out", UpcycleConfig(num_experts=4, seed=0), format="hf")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == name(dtype)
    assert stored_dtypes(tmp_path / "out") == {dtype}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in loaded.parameters()} == {dtype}


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_streamed_native_output_keeps_the_dtype(dtype, tmp_path):
    source = dense_dir(tmp_path, dtype)
    upcycle_fx.convert_checkpoint(source, tmp_path / "out", UpcycleConfig(num_experts=4, seed=0))
    buffers = json.loads((tmp_path / "out" / "upcycle_fx.json").read_text())["non_persistent"]
    assert stored_dtypes(tmp_path / "out", skip=buffers) == {dtype}  # rotary tables stay float32
    model = upcycle_fx.load(tmp_path / "out")
    assert {p.dtype for p in model.parameters()} == {dtype}


@pytest.mark.parametrize("dtype", HALF, ids=name)
def test_in_memory_hf_save_keeps_the_dtype_and_says_so(dtype, tmp_path):
    torch.manual_seed(0)
    dense = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**_decoder_cfg(head_dim=32))).to(dtype)
    model = upcycle_fx.rewrite(dense, num_experts=4, seed=0, verify=False).eval()
    upcycle_fx.save(model, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == name(dtype)
    assert stored_dtypes(tmp_path / "hf") == {dtype}


def test_dtype_argument_casts_every_floating_tensor(tmp_path):
    """dtype="bfloat16" on a float32 checkpoint gives exactly the float32 output cast to bf16
    (MoE layers built from the cast FFN weights), with a bf16 config."""
    source = dense_dir(tmp_path, torch.float32)
    config = UpcycleConfig(num_experts=4, router_init_std=1.0, seed=0)
    upcycle_fx.convert_checkpoint(source, tmp_path / "f32", config, format="hf")
    upcycle_fx.convert_checkpoint(source, tmp_path / "bf16", config, format="hf", dtype="bfloat16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    full, half = tensors_of(tmp_path / "f32"), tensors_of(tmp_path / "bf16")
    assert sorted(full) == sorted(half)
    for key, tensor in full.items():
        assert torch.equal(half[key], tensor.to(torch.bfloat16)), key


def test_save_dtype_argument(tmp_path):
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_decoder_cfg()))
    model = upcycle_fx.rewrite(dense, num_experts=4, seed=0).eval()
    upcycle_fx.save(model, tmp_path / "hf", format="hf", dtype=torch.float16)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float16"
    assert stored_dtypes(tmp_path / "hf") == {torch.float16}
    upcycle_fx.save(model, tmp_path / "native", dtype="bfloat16")
    assert {p.dtype for p in upcycle_fx.load(tmp_path / "native").parameters()} == {torch.bfloat16}
    with pytest.raises(CheckpointError, match="not a floating torch dtype"):
        upcycle_fx.save(model, tmp_path / "bad", dtype="int8")
    assert not (tmp_path / "bad").exists()
