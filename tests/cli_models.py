"""Tiny real model directories for the command-line tests, and a way to run the CLI as users do."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]


def llama_dir(path: Path, *, dtype: torch.dtype = torch.float32, layers: int = 2, hidden: int = 32,
              **save_options) -> Path:
    """A tiny Llama saved with save_pretrained (random weights, seed 0)."""
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(dtype).save_pretrained(path, **save_options)
    return path


def mixtral_dir(path: Path) -> Path:
    """A tiny Mixtral (already a mixture of experts)."""
    config = transformers.MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    return path


def snapshot(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every file under `directory`: equal snapshots, untouched input."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               COLUMNS="200")
    env.update(extra)
    return env


def run_cli(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m upcycle_fx ARGS` in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "upcycle_fx", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=cli_env(**env))


def leftovers(parent: Path) -> list[str]:
    """Hidden staging directories or files a writer left in `parent`."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


WORDS = ["[UNK]", "def", "main", "import", "numpy", "solve", "for", "x", "the", "sum", "of", "two"]


def add_word_tokenizer(directory):
    """A word-level tokenizer without a pad token (as Llama's) saved beside the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]",
                                         model_input_names=["input_ids", "attention_mask"]
                                         ).save_pretrained(directory)
