"""`upcycle-fx rewrite MODEL --out DIR [--format native|hf]`: progress, report, loadable output."""

from __future__ import annotations

import re

import torch
import transformers

import upcycle_fx
from upcycle_fx.cli import main

from helpers import build


def _error(out: str) -> float:
    match = re.search(r"max relative error vs dense\W*([0-9.]+e[+-][0-9]+)", out)
    assert match is not None, out
    return float(match.group(1))


def test_rewrite_out_native(tmp_path, capsys):
    """Streams MODEL's shards into DIR with progress bars over tensors and shards, prints the FFN
    table and the report, measured on the written model loaded back; DIR loads bit-identically
    to an in-memory conversion with the same seed."""
    source = tmp_path / "dense"
    build("llama").save_pretrained(source, max_shard_size="100KB")
    assert main(["rewrite", str(source), "--out", str(tmp_path / "out"), "--experts", "4"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"tensors .*\d+/\d+", out) and re.search(r"shards .*\d+/\d+", out)
    assert "4 FFNs found" in out and "FFNs converted" in out and _error(out) <= 1e-5
    loaded = upcycle_fx.load(tmp_path / "out").eval()
    reference = upcycle_fx.rewrite(transformers.LlamaForCausalLM.from_pretrained(source), num_experts=4,
                                   seed=0).eval()
    ids = torch.randint(4, 256, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_rewrite_out_hf(tmp_path, capsys):
    """--format hf writes a Mixtral (every layer converted) that transformers loads as is."""
    source = tmp_path / "dense"
    build("mistral").save_pretrained(source)
    args = ["rewrite", str(source), "--out", str(tmp_path / "hf"), "--format", "hf", "--pattern", "all",
            "--experts", "4", "--max-shard-size", "200KB"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert _error(out) <= 1e-5
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 1


def test_rewrite_out_errors_exit_2(tmp_path, capsys):
    """An existing output or a family without a stock MoE format: exit 2 and the named error."""
    source = tmp_path / "dense"
    build("gpt2").save_pretrained(source)
    assert main(["rewrite", str(source), "--out", str(tmp_path / "out"), "--no-check"]) == 0
    capsys.readouterr()
    assert main(["rewrite", str(source), "--out", str(tmp_path / "out")]) == 2
    assert "OutputExistsError" in capsys.readouterr().out
    assert main(["rewrite", str(source), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 2
    assert "HFFormatError" in capsys.readouterr().out and not (tmp_path / "hf").exists()


def test_rewrite_out_default_checkpoint(tmp_path, capsys):
    """The built-in real all-MiniLM-L6-v2 (which still stores position_ids) streams as well, with
    its tokenizer files copied; the embeddings of the written model match the dense ones."""
    assert main(["rewrite", "--out", str(tmp_path / "minilm"), "--experts", "4"]) == 0
    assert _error(capsys.readouterr().out) <= 1e-5
    assert (tmp_path / "minilm" / "tokenizer.json").is_file()
    assert len(upcycle_fx.moe_layers(upcycle_fx.load(tmp_path / "minilm"))) == 3
