"""save / load / format="hf" and the written check for models and checks on CUDA (run where a
GPU is), and the device logic of the checks on the CPU."""

from __future__ import annotations

import pytest
import torch
import transformers

import upcycle_fx
from upcycle_fx import UpcycleConfig
from upcycle_fx.exporters.hf_moe import verify_hf_checkpoint
from upcycle_fx.exporters.written_check import check_written
from upcycle_fx.testing.zoo import _decoder_cfg

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def upcycled_llama(device="cpu", dtype=torch.float32, pattern="every_other_mlp"):
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_decoder_cfg())).to(device, dtype).eval()
    return upcycle_fx.rewrite(dense, pattern, num_experts=4, top_k=2, router_init_std=1.0, seed=0,
                              verify=dtype == torch.float32).eval()


def test_hf_check_runs_the_loaded_model_where_asked(tmp_path):
    """The check's device argument (default: the reference's device); on the CPU here."""
    model = upcycled_llama()
    upcycle_fx.save(model, tmp_path / "hf", format="hf", verify=False)
    assert verify_hf_checkpoint(tmp_path / "hf", model, device="cpu") <= 1e-5
    assert verify_hf_checkpoint(tmp_path / "hf", model) <= 1e-5


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["every_other_mlp", "all"])
def test_save_hf_of_a_cuda_model(dtype, pattern, tmp_path):
    """save(model_on_cuda, format="hf") checks the written model on the same GPU and leaves the
    model where it was; from_pretrained gives its logits."""
    model = upcycled_llama("cuda", dtype, pattern)
    upcycle_fx.save(model, tmp_path / "hf", format="hf")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype="auto").cuda().eval()
    ids = torch.randint(4, 256, (2, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    with torch.no_grad():
        expected, actual = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    assert upcycle_fx.report.relative_error(actual, expected) <= tolerance


@cuda
def test_native_save_load_of_a_cuda_model(tmp_path):
    model = upcycled_llama("cuda")
    upcycle_fx.save(model, tmp_path / "native")
    loaded = upcycle_fx.load(tmp_path / "native")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.cpu(), b.cpu()), name


@cuda
@pytest.mark.parametrize("format", ["native", "hf"])
def test_streaming_and_written_check_on_cuda(format, tmp_path):
    """convert_checkpoint(device="cuda") builds the MoE layers on the GPU (same output as on the
    CPU) and check_written(device="cuda") runs the layer comparison there."""
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_decoder_cfg())).to(torch.bfloat16)
    dense.config.dtype = torch.bfloat16
    dense.save_pretrained(tmp_path / "dense")
    config = UpcycleConfig(num_experts=4, router_init_std=1.0, expert_noise_std=0.01, seed=0)
    upcycle_fx.convert_checkpoint(tmp_path / "dense", tmp_path / "gpu", config, format=format, device="cuda")
    upcycle_fx.convert_checkpoint(tmp_path / "dense", tmp_path / "cpu", config, format=format)
    from safetensors.torch import load_file

    gpu = {k: v for f in sorted((tmp_path / "gpu").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    cpu = {k: v for f in sorted((tmp_path / "cpu").glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert sorted(gpu) == sorted(cpu) and all(torch.equal(gpu[k], cpu[k]) for k in cpu)
    on_gpu = check_written(tmp_path / "dense", tmp_path / "gpu", format, device="cuda")
    on_cpu = check_written(tmp_path / "dense", tmp_path / "gpu", format)
    assert on_gpu.layers_checked == on_cpu.layers_checked == 2
    assert on_gpu.max_relative_error == pytest.approx(on_cpu.max_relative_error, rel=1e-3, abs=1e-6)
