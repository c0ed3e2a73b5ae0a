"""`upcycle-fx export-onnx MODEL OUT.onnx [--portable]` (issue 3, point 7)."""

from __future__ import annotations

import pytest
import torch
import transformers

from upcycle_fx.cli import main

from onnx_helpers import ONNX_TOLERANCE, ort_run, ort_session, relative_error


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama saved as a local HF directory (4 layers: blocks 1 and 3 get upcycled)."""
    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _matches_dense(llama_dir, onnx_path) -> bool:
    """The CLI's default upcycling preserves the function, so the file must equal the dense model."""
    dense = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    session = ort_session(onnx_path)
    for shape in [(1, 3), (3, 9)]:
        ids = torch.randint(1, 128, shape, generator=torch.Generator().manual_seed(shape[1]))
        with torch.no_grad():
            expected = dense(input_ids=ids, use_cache=False).logits
        if relative_error(ort_run(session, {"input_ids": ids}), expected) > ONNX_TOLERANCE:
            return False
    return True


@pytest.mark.parametrize("portable", [False, True])
def test_export_onnx_command(llama_dir, tmp_path, capsys, portable):
    out = tmp_path / "llama-moe.onnx"
    argv = ["export-onnx", str(llama_dir), str(out), "--experts", "4"] + (["--portable"] if portable else [])
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"ONNX: {0 if portable else 2} of 2 MoE layers fused (target cpu)" in text
    assert ("fused=False" in text) if portable else ("swiglu(alpha=1, interleaved)" in text)
    assert out.is_file() and "wrote" in text
    assert _matches_dense(llama_dir, out)
    session = ort_session(out)
    assert [o.name for o in session.get_outputs()] == ["logits"], "graph outputs keep the model's names"
    assert [i.name for i in session.get_inputs()] == ["input_ids"]


def test_export_onnx_command_named_error(tmp_path, capsys):
    """A MODEL that is not a model directory: exit code 2 and the reason."""
    assert main(["export-onnx", str(tmp_path), str(tmp_path / "x.onnx")]) == 2
    assert "no config.json" in capsys.readouterr().out


def test_export_onnx_bfloat16_for_cpu_is_refused(llama_dir, tmp_path, capsys):
    """onnxruntime's CPU provider cannot run bfloat16: refused before loading (--dtype) or before
    exporting (a bf16 checkpoint), exit 2, no file."""
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", str(llama_dir), str(out), "--dtype", "bfloat16"]) == 2
    text = capsys.readouterr().out
    assert "OnnxDtypeError" in text and "loading model" not in text
    bf16 = tmp_path / "bf16"
    transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    assert main(["export-onnx", str(bf16), str(out)]) == 2
    text = capsys.readouterr().out
    assert "OnnxDtypeError" in text and "--dtype float32" in text and "loading model" not in text
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bf16"]
