"""Example tensors for a Hugging Face model's forward inputs, one builder per input name.

`hf_example_inputs` asks the builder of the model's `main_input_name` (and of every other input
the forward needs) for a small deterministic tensor read off the model's config. A builder
returns None when the config does not say enough to build its input; the caller then raises a
`CaptureError` that asks for `example_inputs=`. A new modality is one builder function and one
`@input_builder("name")` registration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CaptureError

BATCH, SEQ, DECODER_SEQ = 2, 8, 5


@dataclass
class InputContext:
    """What a builder may read: the model, its config, the sizes and one seeded generator."""

    model: nn.Module
    config: Any
    generator: torch.Generator
    batch: int = BATCH
    seq: int = SEQ


Builder = Callable[[InputContext], "torch.Tensor | None"]
BUILDERS: dict[str, Builder] = {}


def input_builder(*names: str) -> Callable[[Builder], Builder]:
    """Decorator: `fn(context) -> tensor | None` builds the forward inputs called `names`."""
    def register(fn: Builder) -> Builder:
        for name in names:
            BUILDERS[name] = fn
        return fn
    return register


def token_ids(config, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random ids in [4, vocab): the usual special-token ids skipped."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    if vocab < 8:
        raise CaptureError("the model's config has no usable vocab_size; pass example_inputs=.")
    low = min(4, vocab - 1)
    return torch.randint(low, vocab, shape, generator=generator)


@input_builder("input_ids")
def build_input_ids(context: InputContext) -> torch.Tensor:
    return token_ids(context.config, (context.batch, context.seq), context.generator)


@input_builder("decoder_input_ids")
def build_decoder_input_ids(context: InputContext) -> torch.Tensor:
    return token_ids(context.config, (context.batch, DECODER_SEQ), context.generator)


@input_builder("pixel_values")
def build_pixel_values(context: InputContext) -> torch.Tensor:
    config = context.config
    channels = getattr(config, "num_channels", 3)
    size = getattr(config, "image_size", 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return torch.randn(context.batch, channels, height, width, generator=context.generator)


from . import audio_inputs, generic_inputs, timeseries_inputs, video_inputs  # noqa: E402,F401 - register their builders
