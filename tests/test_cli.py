"""The command line: inspect and rewrite on the built-in real checkpoint and on a local HF dir."""

from __future__ import annotations

import re
import subprocess
import sys

import transformers

from upcycle_fx.cli import main


def test_inspect_default_checkpoint(capsys):
    """`upcycle-fx inspect` lists MiniLM's six FFNs and marks blocks 1, 3, 5 for conversion."""
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    assert "6 FFNs found" in out
    rows = [line for line in out.splitlines() if "encoder.layer." in line]
    assert len(rows) == 6
    assert [("yes" in row) for row in rows] == [False, True, False, True, False, True]


def test_rewrite_default_checkpoint_reports(capsys):
    """`upcycle-fx rewrite` converts 3 FFNs, reports parameters and an error below 1e-5."""
    assert main(["rewrite", "--experts", "4", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "FFNs converted" in out and "active parameters per token" in out
    error = re.search(r"max relative error vs dense\W*([0-9.]+e[+-][0-9]+)", out)
    assert error is not None and float(error.group(1)) <= 1e-5
    before = 22_713_216  # all-MiniLM-L6-v2
    ffn = 384 * 1536 * 2 + 1536 + 384
    after = before + 3 * (3 * ffn + 4 * 384)
    assert f"{before:,}" in out and f"{after:,}" in out


def test_rewrite_local_model_directory(tmp_path, capsys):
    """A local HF directory (saved from a tiny Llama) is loaded and converted."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert main(["rewrite", str(tmp_path), "--pattern", "all", "--experts", "2", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "4 FFNs found" in out and "gated" in out and "silu" in out


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    """A directory without config.json: exit code 2 and a message saying what MODEL must be."""
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().out


def test_module_entry_point_runs():
    """`python -m upcycle_fx --help` works (the console script calls the same main)."""
    result = subprocess.run([sys.executable, "-m", "upcycle_fx", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "inspect" in result.stdout and "rewrite" in result.stdout


def test_rewrite_of_a_model_whose_tokenizer_has_no_pad_token(tmp_path):
    """Llama-style tokenizers have no pad token; the sample input must not need one."""
    from tests.cli_models import add_word_tokenizer, llama_dir, run_cli

    model = llama_dir(tmp_path / "llama")
    add_word_tokenizer(model)
    done = run_cli("rewrite", model, "--experts", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
