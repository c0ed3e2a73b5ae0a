"""Example inputs: the user's, or ones built from a Hugging Face model's own config."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError

_SEED = 0
_BATCH, _SEQ, _DECODER_SEQ = 2, 8, 5


@dataclass
class ModelInputs:
    """Positional and keyword arguments of one forward call."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]


def is_hf_model(model: nn.Module) -> bool:
    """A transformers `PreTrainedModel` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def as_model_inputs(example_inputs: Any) -> ModelInputs:
    """Accept a tensor, a tuple/list of positional args, a dict of kwargs, or ModelInputs."""
    if isinstance(example_inputs, ModelInputs):
        return example_inputs
    if isinstance(example_inputs, dict):
        return ModelInputs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return ModelInputs(tuple(example_inputs), {})
    return ModelInputs((example_inputs,), {})


def resolve_inputs(model: nn.Module, example_inputs: Any = None) -> ModelInputs | None:
    """The inputs to capture with: the user's, an HF model's own, or None (symbolic capture)."""
    if example_inputs is not None:
        inputs = as_model_inputs(example_inputs)
    elif is_hf_model(model):
        inputs = hf_example_inputs(model)
    else:
        return None
    if is_hf_model(model):
        inputs = ModelInputs(inputs.args, {**hf_fixed_kwargs(model), **inputs.kwargs})
    return inputs


def hf_fixed_kwargs(model: nn.Module) -> dict[str, Any]:
    """No KV cache objects in the graph, plain tuples out."""
    params = inspect.signature(model.forward).parameters
    fixed = {"return_dict": False}
    if "use_cache" in params:
        fixed["use_cache"] = False
    return fixed


def hf_example_inputs(model: nn.Module, batch: int = _BATCH, seq: int = _SEQ) -> ModelInputs:
    """Small deterministic inputs from the model's config and `main_input_name`."""
    config = model.config
    generator = torch.Generator().manual_seed(_SEED)
    device = next(iter(model.parameters()), torch.empty(0)).device
    name = getattr(model, "main_input_name", "input_ids")
    kwargs: dict[str, Any] = {}
    if name == "input_ids":
        kwargs["input_ids"] = _token_ids(config, (batch, seq), generator)
    elif name == "pixel_values":
        channels = getattr(config, "num_channels", 3)
        size = getattr(config, "image_size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        kwargs["pixel_values"] = torch.randn(batch, channels, height, width, generator=generator)
    else:
        raise CaptureError(
            f"{type(model).__name__}: cannot build example inputs for its main input "
            f"{name!r}; pass example_inputs={{'{name}': tensor, ...}} to capture it."
        )
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = _token_ids(config, (batch, _DECODER_SEQ), generator)
    return ModelInputs((), {k: v.to(device) for k, v in kwargs.items()})


def _token_ids(config, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    if vocab < 8:
        raise CaptureError("the model's config has no usable vocab_size; pass example_inputs=.")
    low = min(4, vocab - 1)  # skip the usual special-token ids
    return torch.randint(low, vocab, shape, generator=generator)
