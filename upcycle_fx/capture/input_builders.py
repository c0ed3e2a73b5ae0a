"""Example tensors for a Hugging Face model's forward inputs, one builder per input name.

`hf_example_inputs` asks the builder of the model's `main_input_name` (and of every other input
the forward needs) for a small deterministic tensor read off the model's config. A builder
returns None when the config does not say enough to build its input; the caller then raises a
`CaptureError` that asks for `example_inputs=`. A new modality is one builder function and one
`@input_builder("name")` registration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CaptureError

BATCH, SEQ, DECODER_SEQ = 2, 8, 5


@dataclass
class InputContext:
    """What a builder may read: the model, its config, the sizes, one seeded generator, the
    names of the forward's parameters, and `shared`: values that builders of a set of inputs
    agree on (one image grid for the patches, their grid and the image tokens)."""

    model: nn.Module
    config: Any
    generator: torch.Generator
    batch: int = BATCH
    seq: int = SEQ
    parameters: tuple[str, ...] = ()
    shared: dict[str, Any] = field(default_factory=dict)

    def takes(self, *names: str) -> bool:
        """Whether the forward has a parameter of one of these names."""
        return any(name in self.parameters for name in names)


Builder = Callable[[InputContext], "torch.Tensor | None"]
BUILDERS: dict[str, Builder] = {}
Variants = Callable[[InputContext, torch.Tensor], "list[torch.Tensor]"]
VARIANTS: dict[str, Variants] = {}


def input_builder(*names: str) -> Callable[[Builder], Builder]:
    """Decorator: `fn(context) -> tensor | None` builds the forward inputs called `names`."""
    def register(fn: Builder) -> Builder:
        for name in names:
            BUILDERS[name] = fn
        return fn
    return register


def input_variants(*names: str) -> Callable[[Variants], Variants]:
    """Decorator: `fn(context, tensor) -> [tensor, ...]` gives other layouts of the built input
    (a clip as frames, an image as a one-frame clip...), tried in order when the model does not
    run on the first; the config alone does not always say which layout the forward takes."""
    def register(fn: Variants) -> Variants:
        for name in names:
            VARIANTS[name] = fn
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


@input_builder("lang_ids")
def build_lang_ids(context: InputContext) -> torch.Tensor:
    """The first language of a multilingual model with per-language modules (X-MOD)."""
    return torch.zeros(context.batch, dtype=torch.long)


from . import vision_inputs  # noqa: E402,F401  (registers the image and multimodal builders)
from . import audio_inputs, generic_inputs, timeseries_inputs, video_inputs  # noqa: E402,F401 - register their builders
