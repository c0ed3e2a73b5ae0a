"""The bounded-memory check of a written checkpoint (`written_check.py`): float32, layer by layer,
for both formats and half-precision weights; it still sees a wrong conversion."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import upcycle_fx
from upcycle_fx import UpcycleConfig
from upcycle_fx.exporters.written_check import check_written, written_error
from upcycle_fx.testing.zoo import _decoder_cfg

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import convert_memory  # noqa: E402  (benchmarks/convert_memory.py: the same measurement, larger)

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
CONFIG = UpcycleConfig(num_experts=4, top_k=2, router_init_std=1.0, seed=0)


def dense_dir(tmp_path: Path, dtype=torch.float32) -> Path:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_decoder_cfg())).to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def corrupt(directory: Path, name_part: str, change) -> str:
    """Apply `change` to the first stored tensor whose name contains `name_part`, in place."""
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name in sorted(tensors):
            if name_part in name:
                tensors[name] = change(tensors[name].clone())
                save_file(tensors, str(file), metadata={"format": "pt"})
                return name
    raise AssertionError(f"no tensor {name_part}")


@pytest.mark.parametrize("format", ["native", "hf"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_function_preserving_output_passes_in_float32(format, dtype, tmp_path):
    """Whatever the storage dtype, the check computes in float32: error <= 1e-5."""
    source = dense_dir(tmp_path, dtype)
    upcycle_fx.convert_checkpoint(source, tmp_path / "out", CONFIG, format=format)
    result = check_written(source, tmp_path / "out", format)
    assert result.ok and result.max_relative_error <= 1e-5 and result.tolerance == 1e-5
    assert result.dtype == dtype and result.layers_checked == 2 and result.tensors_compared >= 30
    assert written_error(source, tmp_path / "out", format) == result.max_relative_error


def test_a_cast_output_is_compared_with_the_rounded_dense_weights(tmp_path):
    source = dense_dir(tmp_path)
    upcycle_fx.convert_checkpoint(source, tmp_path / "out", CONFIG, format="hf", dtype="bfloat16")
    result = check_written(source, tmp_path / "out", "hf")
    assert result.dtype == torch.bfloat16 and result.ok


@pytest.mark.parametrize("format, expert", [("native", "experts.up_proj"), ("hf", "experts.2.up_proj")])
def test_one_corrupted_expert_is_reported(format, expert, tmp_path):
    """One expert's up projection scaled in the written file: a large error, at that layer."""
    source = dense_dir(tmp_path, torch.bfloat16)
    upcycle_fx.convert_checkpoint(source, tmp_path / "out", CONFIG, format=format)

    def scale_one_expert(t):  # native: experts stacked in one tensor; hf: one tensor per expert
        if format == "native":
            t[2] *= 3
            return t
        return t * 3

    name = corrupt(tmp_path / "out", expert, scale_one_expert)
    result = check_written(source, tmp_path / "out", format)
    assert not result.ok and result.max_relative_error > 0.05, result
    assert name.split(".mlp")[0] in result.worst, (name, result.worst)


def test_a_corrupted_attention_weight_is_reported(tmp_path):
    source = dense_dir(tmp_path)
    upcycle_fx.convert_checkpoint(source, tmp_path / "out", CONFIG, format="hf")
    name = corrupt(tmp_path / "out", "layers.0.self_attn.o_proj", lambda t: t + 0.01)
    result = check_written(source, tmp_path / "out", "hf")
    assert not result.ok and result.worst == f"tensor {name}"


@pytest.mark.slow
def test_check_memory_is_bounded(tmp_path):
    """benchmarks/convert_memory.py's measurement of the check at CI size (12 layers, 59 MB
    float32, 4 MB shards, 4 experts): the peak may exceed the check of a 2-layer model by at
    most 2 x the largest input shard + one MoE layer and its FFN in float32 (E + 3 FFN copies)
    + 40 MB of allocator slack; loading both models whole would need 56 + 112 MB."""
    shard = 4 * 10**6
    shape = convert_memory.PRESETS["small"]
    for name, preset in (("dense", shape), ("tiny", convert_memory.PRESETS["tiny"])):
        convert_memory.make_checkpoint(tmp_path / name, preset, dtype="float32", max_shard_bytes=shard)
        convert_memory.in_child(convert_memory._CONVERT, tmp_path / name, tmp_path / f"{name}-out", "native", 4)
    tiny = convert_memory.in_child(convert_memory._CHECK, tmp_path / "tiny", tmp_path / "tiny-out", "native")
    small = convert_memory.in_child(convert_memory._CHECK, tmp_path / "dense", tmp_path / "dense-out", "native")
    assert small.result["error"] <= 1e-5 and small.result["layers_checked"] == 6
    peak = small.result["vm_hwm"] or small.peak_rss
    fixed = tiny.result["vm_hwm"] or tiny.peak_rss
    ffn_bytes = 3 * shape["hidden_size"] * shape["intermediate_size"] * 4
    allowance = 2 * shard + (4 + 3) * ffn_bytes + 40 * 2**20
    assert peak - fixed < allowance, (peak, fixed, allowance)
