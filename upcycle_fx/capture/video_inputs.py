"""Example inputs of video models (`pixel_values_videos`), read off the config: `num_frames`
(or `frames_per_clip`, cut to a few tubelets), `image_size`, `num_channels`, `tubelet_size`.
Frames first ([batch, frames, channels, height, width]) is tried before channels first
(`input_probe`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .input_builders import InputContext, input_builder
from .input_probe import Candidate, config_int, first_that_runs, unique

FEW_TUBELETS = 2  # a clip longer than MAX_FRAMES is tried this many tubelets long first
MAX_FRAMES = 16


def _tubelet_frames(config) -> int:
    """Frames per tubelet: `tubelet_size` as an int, or the first of (time, height, width)."""
    for sub in [config, getattr(config, "vision_config", None)]:
        size = getattr(sub, "tubelet_size", None)
        if isinstance(size, int):
            return size
        if isinstance(size, (list, tuple)) and size and isinstance(size[0], int):
            return size[0]
    return 1


def frame_counts(context: InputContext) -> list[int]:
    """The declared frame count when short, else a couple of tubelets (a long clip is slow)."""
    config = context.config
    tubelet = _tubelet_frames(config)
    declared = config_int(config, "num_frames", "frames_per_clip")
    short = declared if declared and declared <= MAX_FRAMES else None
    return unique([short, tubelet * FEW_TUBELETS, MAX_FRAMES, declared])


def video_candidates(context: InputContext) -> Iterator[Candidate]:
    config, batch = context.config, context.batch
    channels = config_int(config, "num_channels") or 3
    size = config_int(config, "image_size", "crop_size") or 224
    for frames in frame_counts(context):
        for shape in [(batch, frames, channels, size, size), (batch, channels, frames, size, size)]:
            yield {"pixel_values_videos": torch.randn(*shape, generator=context.generator)}


@input_builder("pixel_values_videos")
def build_pixel_values_videos(context: InputContext) -> Candidate:
    return first_that_runs(context, "pixel_values_videos", video_candidates(context))
