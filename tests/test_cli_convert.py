"""`upcycle-fx convert NATIVE_DIR OUT --format hf`: a native checkpoint in a stock format."""

from __future__ import annotations

import torch
import transformers

import upcycle_fx
from upcycle_fx.cli import main

from cli_models import llama_dir, snapshot


def test_convert_native_to_hf(tmp_path, capsys):
    """Native -> Mixtral (every layer converted): transformers loads it and its logits equal the
    native model's; the native input is untouched."""
    model = llama_dir(tmp_path / "llama")
    native = tmp_path / "native"
    assert main(["rewrite", str(model), "--out", str(native), "--pattern", "all", "--experts", "4",
                 "--no-check"]) == 0
    before = snapshot(native)
    capsys.readouterr()
    assert main(["convert", str(native), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert "loaded back and checked" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = upcycle_fx.load(native).eval()(input_ids=ids).logits
        assert torch.allclose(hf(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    assert snapshot(native) == before


def test_convert_refuses_what_is_not_native(tmp_path, capsys):
    model = llama_dir(tmp_path / "llama")
    assert main(["convert", str(model), str(tmp_path / "out")]) == 2
    out = capsys.readouterr().out
    assert "not an upcycle_fx checkpoint" in out and "rewrite MODEL --out" in out
    assert not (tmp_path / "out").exists()


def test_convert_native_with_dtype(tmp_path, capsys):
    model = llama_dir(tmp_path / "llama")
    native = tmp_path / "native"
    assert main(["rewrite", str(model), "--out", str(native), "--experts", "2", "--no-check"]) == 0
    assert main(["convert", str(native), str(tmp_path / "half"), "--format", "native",
                 "--dtype", "float16"]) == 0
    assert {p.dtype for p in upcycle_fx.load(tmp_path / "half").parameters()} == {torch.float16}
