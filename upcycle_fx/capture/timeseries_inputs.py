"""Example inputs of time-series models: past values of a forecaster (`past_values`) and the
trajectories of a decision transformer (`states`), read off the config.

A forecaster reads `context_length` steps of `num_input_channels` series, cut into patches of
`patch_length`; the layout ([batch, steps, channels] or [batch, steps]) is tried in turn
(`input_probe`). Padding indicators the forward requires are all-valid (zeros), a frequency
index is 0.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .input_builders import InputContext, input_builder
from .input_probe import Candidate, config_int, first_that_runs, required_inputs, unique

LONG_CONTEXT = 2048  # longer contexts are tried after a few patches' worth
PATCHES = 8


def context_lengths(context: InputContext) -> list[int]:
    """Steps to try: the config's context length (when short enough), a few patches, 64."""
    config = context.config
    length = config_int(config, "context_length", "input_size", "seq_len")
    patch = config_int(config, "patch_length", "patch_len")
    short = [patch * PATCHES] if patch else []
    if length and length <= LONG_CONTEXT:
        return unique([length, *short, 64])
    return unique([*short, 64, length])


def _companions(context: InputContext, steps: int, series: tuple[int, ...]) -> Candidate:
    """Required padding indicators (0: a real value) and frequency indices (0)."""
    companions: Candidate = {}
    for name in required_inputs(context.model):
        if name.endswith("_padding"):
            companions[name] = torch.zeros(context.batch, steps, dtype=torch.long)
        elif name == "freq":
            companions[name] = torch.zeros(context.batch, 1, dtype=torch.long)
        elif name.endswith("observed_mask"):
            companions[name] = torch.ones(context.batch, steps, *series)
    return companions


def past_value_candidates(context: InputContext) -> Iterator[Candidate]:
    channels = config_int(context.config, "num_input_channels", "input_channels", "enc_in")
    layouts = [(channels,), ()] if channels else [(), (1,)]  # [batch, steps, series] / [batch, steps]
    for steps in context_lengths(context):
        for series in layouts:
            values = torch.randn(context.batch, steps, *series, generator=context.generator)
            yield {"past_values": values, **_companions(context, steps, series)}


@input_builder("past_values")
def build_past_values(context: InputContext) -> Candidate:
    return first_that_runs(context, "past_values", past_value_candidates(context))


@input_builder("states")
def build_trajectories(context: InputContext) -> Candidate | None:
    """A decision transformer's (return-to-go, state, action) steps: `state_dim`, `act_dim`,
    timesteps below `max_ep_len`, all steps attended."""
    config, batch, steps, generator = context.config, context.batch, context.seq, context.generator
    state_dim, act_dim = config_int(config, "state_dim"), config_int(config, "act_dim")
    if state_dim is None or act_dim is None:
        return None
    episode = config_int(config, "max_ep_len") or steps
    trajectory = {
        "states": torch.randn(batch, steps, state_dim, generator=generator),
        "actions": torch.randn(batch, steps, act_dim, generator=generator),
        "rewards": torch.randn(batch, steps, 1, generator=generator),
        "returns_to_go": torch.randn(batch, steps, 1, generator=generator),
        "timesteps": torch.randint(0, episode, (batch, steps), generator=generator),
        "attention_mask": torch.ones(batch, steps, dtype=torch.long),
    }
    return first_that_runs(context, "states", [trajectory])
