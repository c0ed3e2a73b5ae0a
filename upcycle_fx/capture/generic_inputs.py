"""Example inputs that are already vectors (`inputs_embeds`, `hidden_states`, ...), Perceiver-style
`inputs` of any modality, and Pix2Struct's `flattened_patches`.

A vector input is [batch, seq, width]; the width is the config's hidden size or the input width
of one of the model's first layers (a projection of concatenated hidden states), tried in turn
(`input_probe`). Several vector inputs of one forward are tried together.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
from torch import nn

from .audio_inputs import feature_candidates, waveform_candidates
from .input_builders import InputContext, input_builder, token_ids
from .input_probe import Candidate, config_int, first_that_runs, forward_parameters, required_inputs, unique
from .vision_inputs import GRID_INPUTS, flat_patches

VECTOR_INPUTS = ("inputs_embeds", "hidden_states", "noise_embeds", "context_hidden_states", "action_embeds")


def vector_widths(context: InputContext, first: int = 4) -> list[int]:
    """The config's hidden width, then the input widths of the first Linear / LayerNorm layers."""
    layers = []
    for module in context.model.modules():
        if isinstance(module, nn.Linear):
            layers.append(module.in_features)
        elif isinstance(shape := getattr(module, "normalized_shape", None), tuple) and len(shape) == 1:
            layers.append(shape[0])
    named = config_int(context.config, "hidden_size", "d_model", "dim", "n_embd", "embed_dim")
    return unique([named, *layers])[:first]


def _vector_names(context: InputContext) -> list[str]:
    """The vector inputs to build: the main input and the required ones."""
    main = getattr(context.model, "main_input_name", None)
    required = required_inputs(context.model)
    return [n for n in forward_parameters(context.model)
            if n in VECTOR_INPUTS and (n == main or n in required)]


def vector_candidates(context: InputContext) -> Iterator[Candidate]:
    names, widths = _vector_names(context), vector_widths(context)
    combos = sorted(itertools.product(range(len(widths)), repeat=len(names)),
                    key=lambda ranks: (sum(ranks), ranks))
    for ranks in combos:
        yield {name: torch.randn(context.batch, context.seq, widths[r], generator=context.generator)
               for name, r in zip(names, ranks)}


@input_builder(*VECTOR_INPUTS)
def build_vectors(context: InputContext) -> Candidate | None:
    if context.takes(*GRID_INPUTS):  # a vision tower fed flattened patches with their grid
        return flat_patches(context)
    if not _vector_names(context):
        return None
    return first_that_runs(context, " and ".join(_vector_names(context)), vector_candidates(context))


@input_builder("inputs")
def build_inputs(context: InputContext) -> Candidate:
    """A modality-agnostic `inputs` (Perceiver, a speech encoder-decoder): token ids when the
    config has a vocabulary, else a waveform, else mel features."""
    def candidates() -> Iterator[Candidate]:
        vocab = config_int(context.config, "vocab_size")
        if vocab and vocab >= 8:
            yield {"inputs": token_ids(context.config, (context.batch, context.seq), context.generator)}
        yield from waveform_candidates(context, "inputs")
        yield from feature_candidates(context, "inputs")
    return first_that_runs(context, "inputs", candidates())


@input_builder("flattened_patches")
def build_flattened_patches(context: InputContext) -> Candidate | None:
    """Pix2Struct: per patch its row and column index, then `patch_embed_hidden_size` pixels."""
    width = config_int(context.config, "patch_embed_hidden_size")
    if width is None:
        return None
    batch, seq = context.batch, context.seq
    rows = config_int(context.config, "seq_len") or seq
    positions = torch.randint(0, min(rows, seq), (batch, seq, 2), generator=context.generator).float()
    pixels = torch.randn(batch, seq, width, generator=context.generator)
    return first_that_runs(context, "flattened_patches",
                           [{"flattened_patches": torch.cat([positions, pixels], dim=-1)}])


@input_builder("task_inputs")
def build_task_inputs(context: InputContext) -> Candidate | None:
    """OneFormer's task prompt: `task_seq_len` token ids of its text encoder's vocabulary."""
    vocab = config_int(context.config, "text_encoder_vocab_size", "vocab_size")
    if vocab is None or vocab < 8:
        return None
    length = config_int(context.config, "task_seq_len") or context.seq
    return {"task_inputs": torch.randint(4, vocab, (context.batch, length), generator=context.generator)}
