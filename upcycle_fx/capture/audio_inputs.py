"""Example inputs of speech and audio models: mel features (`input_features`, `audio_mel`) and
waveforms (`input_values`), read off the config and checked by one forward each.

Sizes come from the config: the feature width (`num_mel_bins`, `feature_size`,
`input_feat_per_channel`, ...), the frame count a Whisper-style encoder needs
(2 x `max_source_positions`), the samples a convolutional feature encoder needs for a few frames
(`conv_kernel`, `conv_stride`), a codec's `hop_length`. The layout ([batch, mel, frames] or
[batch, frames, mel], a channel axis for a waveform) is tried in turn (`input_probe`). Masks the
forward asks for beside the features are all-valid.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import torch
from torch import nn

from .input_builders import InputContext, input_builder
from .input_probe import Candidate, config_int, first_that_runs, forward_parameters, required_inputs, unique

FRAMES = (256, 200, 100, 400, 1000, 3000)  # multiples of the usual windows and subsamplings
WAVEFORM_FRAMES = 16  # frames a waveform should give after the feature encoder
PAIRED_FEATURES = 4  # feature layouts tried beside each waveform layout


def _input_layer_widths(model: nn.Module, widths: list[int], first: int = 3) -> list[int]:
    """Input widths of layers the config does not name: a Linear / Conv1d reading a whole number
    of frames stacked (2 to 8 x a named width), then the first few layers registered."""
    layers = [m.in_features if isinstance(m, nn.Linear) else m.in_channels
              for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    stacked = [w for w in layers if any(w == k * named for named in widths for k in range(2, 9))]
    return stacked + layers[:first]


def feature_widths(context: InputContext) -> list[int]:
    """Mel / filter-bank widths to try: what the config names first, the usual 128 and 80, then
    widths of the model's input layers."""
    config = context.config
    stacked = None
    per_channel = config_int(config, "input_feat_per_channel")
    if per_channel:
        stacked = per_channel * (config_int(config, "input_channels") or 1)
    named = unique([stacked, *(config_int(config, name) for name in (
        "input_size", "feature_projection_input_dim", "num_mel_bins", "input_feat_size",
        "feature_size", "n_mels", "mel_bins"))])
    return unique([*named, 128, 80, *_input_layer_widths(context.model, named or [128, 80])])


def _channels_first(model: nn.Module, width: int) -> bool:
    """Whisper-style: a Conv1d reads the mel bins as channels."""
    return any(isinstance(m, nn.Conv1d) and m.in_channels == width for m in model.modules())


def frame_counts(context: InputContext) -> list[int]:
    """Frame counts to try: the one a Whisper-style encoder needs, then common multiples."""
    positions = config_int(context.config, "max_source_positions")
    return unique([2 * positions if positions else None, *FRAMES])


def _companions(context: InputContext, main: str, count: int, samples_per_step: int | None) -> Candidate:
    """All-valid masks over the `count` steps of `main` (`<main>_mask`, a required
    `attention_mask` or `padding_mask`) and required lengths (`*_lengths`: steps, or samples
    when the name says so)."""
    params, required = forward_parameters(context.model), required_inputs(context.model)
    companions: Candidate = {}
    for name in params:
        if name == f"{main}_mask" or (name in ("attention_mask", "padding_mask") and name in required):
            companions[name] = torch.ones(context.batch, count, dtype=torch.long)
        elif name in required and name.endswith(("_lengths", "_lens")):
            scale = (samples_per_step or 1) if "sample" in name else 1
            companions[name] = torch.full((context.batch,), count * scale, dtype=torch.long)
    return companions


def feature_candidates(context: InputContext, name: str, frames: list[int] | None = None,
                       companions: bool = True) -> Iterator[Candidate]:
    """[batch, width, frames] / [batch, frames, width] / with a channel axis, each with its
    companion inputs; ordered by the sum of the ranks of width, layout and frame count, so the
    preferred of each comes first and no one choice runs through all the others."""
    batch = context.batch
    widths, counts = feature_widths(context), frames or frame_counts(context)
    choices = []
    for w, width in enumerate(widths):
        layouts = [(batch, width, None), (batch, None, width)]
        if not _channels_first(context.model, width):
            layouts.reverse()
        layouts += [(batch, 1, None, width), (batch, 1, width, None)]
        for lay, layout in enumerate(layouts):
            for f, count in enumerate(counts):
                if count != width:
                    choices.append((w + lay + f, f, tuple(count if d is None else d for d in layout), count))
    for _, _, shape, count in sorted(choices, key=lambda c: c[:2]):
        candidate = {name: torch.randn(*shape, generator=context.generator)}
        if companions:
            candidate.update(_companions(context, name, count, _hop_length(context.config)))
        yield candidate


@input_builder("input_features")
def build_input_features(context: InputContext) -> Candidate:
    return first_that_runs(context, "input_features", feature_candidates(context, "input_features"))


@input_builder("audio_mel")
def build_audio_mel(context: InputContext) -> Candidate:
    """Gemma 3n's audio encoder: `audio_mel_mask` is True on padding, so all-valid is zeros."""
    def candidates() -> Iterator[Candidate]:
        for candidate in feature_candidates(context, "audio_mel", companions=False):
            features = candidate["audio_mel"]
            if features.dim() == 3:
                mask = torch.zeros(features.shape[0], features.shape[1], dtype=torch.bool)
                yield {"audio_mel": features, "audio_mel_mask": mask}
    return first_that_runs(context, "audio_mel", candidates())


def waveform_lengths(context: InputContext) -> list[int]:
    """Sample counts: enough for a few frames out of the convolutional feature encoder
    (`conv_kernel`, `conv_stride`), a whole number of codec hops, a second of audio."""
    config = context.config
    lengths = []
    kernels, strides = _conv_geometry(config)
    if kernels:
        frames = WAVEFORM_FRAMES
        for kernel, stride in reversed(list(zip(kernels, strides))):
            frames = (frames - 1) * stride + kernel
        lengths.append(frames)
    hop = _hop_length(config)
    if hop:
        lengths.append(hop * WAVEFORM_FRAMES // 2)
    rate = config_int(config, "sampling_rate") or 16000
    lengths += [rate // 4 if hop is None else hop * max(1, rate // (4 * hop)), 16000, 3200]
    return unique(lengths)


def _conv_geometry(config) -> tuple[list[int], list[int]]:
    for sub in [config, *[getattr(config, n, None) for n in ("encoder", "audio_config", "encoder_config")]]:
        kernels, strides = getattr(sub, "conv_kernel", None), getattr(sub, "conv_stride", None)
        if (isinstance(kernels, (list, tuple)) and isinstance(strides, (list, tuple))
                and len(kernels) == len(strides)):
            return list(kernels), list(strides)
    return [], []


def _hop_length(config) -> int | None:
    hop = config_int(config, "hop_length", "frame_size", "hop_size")
    if hop:
        return hop
    ratios = getattr(config, "downsampling_ratios", None) or getattr(config, "upsampling_ratios", None)
    if isinstance(ratios, (list, tuple)) and ratios and all(isinstance(r, int) for r in ratios):
        return math.prod(ratios)
    return None


def waveform_candidates(context: InputContext, name: str) -> Iterator[Candidate]:
    """[batch, samples] / [batch, channels, samples], and the mel spectrogram an audio
    spectrogram transformer takes as `input_values`; mel features beside the waveform when
    the forward requires them too (a codec with a semantic encoder)."""
    config, batch, generator = context.config, context.batch, context.generator
    channels = config_int(config, "audio_channels", "num_channels", "channels") or 1
    with_features = "input_features" in required_inputs(context.model)
    hop = _hop_length(config)
    for length in waveform_lengths(context):
        for shape in unique([(batch, length), (batch, channels, length), (batch, 1, length)]):
            waveform = {name: torch.randn(*shape, generator=generator)}
            waveform.update(_companions(context, name, length, 1))
            if not with_features:
                yield waveform
                continue
            frames = unique(length // h for h in (hop, (hop or 0) // 2, 320, 160) if h)
            paired = feature_candidates(context, "input_features", frames, companions=False)
            for features in itertools.islice(paired, PAIRED_FEATURES):
                yield {**waveform, **features}
    frames = config_int(config, "max_length", "max_source_positions")
    width = config_int(config, "num_mel_bins", "feature_size")
    if frames and width:
        yield {name: torch.randn(batch, frames, width, generator=generator)}


def _decoder_values(context: InputContext, width: int | None) -> Candidate:
    """SpeechT5-style decoders read frames (`decoder_input_values`), not token ids."""
    if "decoder_input_values" not in forward_parameters(context.model):
        return {}
    width = width or config_int(context.config, "num_mel_bins") or 80
    return {"decoder_input_values": torch.randn(context.batch, 5, width, generator=context.generator)}


def _hidden_states(context: InputContext, name: str) -> Iterator[Candidate]:
    """A model without its speech pre-nets (SpeechT5Model) reads hidden states as `input_values`."""
    width = config_int(context.config, "hidden_size", "d_model")
    if width:
        yield {name: torch.randn(context.batch, context.seq, width, generator=context.generator),
               **_decoder_values(context, width)}


@input_builder("input_values")
def build_input_values(context: InputContext) -> Candidate:
    def candidates() -> Iterator[Candidate]:
        for candidate in waveform_candidates(context, "input_values"):
            yield {**candidate, **_decoder_values(context, None)}
        yield from _hidden_states(context, "input_values")
    return first_that_runs(context, "input_values", candidates())
