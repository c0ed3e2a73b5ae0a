"""Example inputs of image, video and layout models, read off the (vision) config.

Three forms of images, told apart by what the forward and the config declare:

- a batch of images `[batch, channels, height, width]` (ViT, CLIP, DETR...), or of clips
  `[batch, frames, channels, height, width]` when the config declares `num_frames`;
- flattened patches `[patches, channels * temporal_patch * patch * patch]` with their grid, when
  the forward takes a grid (`grid_thw`, `image_grid_thw`: Qwen2-VL-style vision towers);
- patch sequences `[batch, patches, channels * patch * patch]` with `spatial_shapes` and a
  `pixel_attention_mask` (NaFlex / SigLIP2-style) or with `pixel_position_ids` (Gemma 4).

The builders of one set of inputs (patches, their grid, the merge sizes) agree on one image grid
kept in `InputContext.shared`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .input_builders import InputContext, input_builder, input_variants, token_ids

DEFAULT_IMAGE_SIZE = 64  # for a config that declares none (DETR-style detectors): 2x2 after /32
GRID_INPUTS = ("grid_thw", "image_grid_thw")
SEQUENCE_INPUTS = ("spatial_shapes", "pixel_position_ids")
MERGE_NAMES = ("spatial_merge_size", "merge_size", "merge_kernel_size")
TEMPORAL_NAMES = ("temporal_patch_size", "patch_temporal")
NUM_BOXES = 4


# --------------------------------------------------------------------------- the config


def _sub_configs(config) -> list[tuple[str, Any]]:
    return [(name, value) for name, value in vars(config).items()
            if hasattr(value, "to_dict") and hasattr(value, "model_type")]


def _declares_images(config) -> bool:
    return any(isinstance(getattr(config, name, None), (int, list, tuple))
               for name in ("image_size", "patch_size", "num_channels", "in_channels"))


def vision_config(config):
    """The (sub-)config that describes the images: the config itself when it declares an image
    or patch size, else its vision sub-config (`vision_config`, a vision `encoder`...)."""
    if _declares_images(config):
        return config
    subs = _sub_configs(config)
    for name, sub in sorted(subs, key=lambda item: "vision" not in item[0]):
        if _declares_images(sub):
            return sub
    return config


def _int(config, *names: str, default: int) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return default


def image_size(config) -> tuple[int, int]:
    """(height, width) the vision config declares (`image_size` as an int, a pair or a dict),
    large enough for a detector's `num_queries` (see `_size_for_queries`)."""
    size = getattr(vision_config(config), "image_size", None)
    if isinstance(size, dict):
        size = (size.get("height"), size.get("width"))
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        size = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    least = _size_for_queries(config)
    return max(size[0], least), max(size[1], least)


def _size_for_queries(config) -> int:
    """The side (a multiple of 32) whose stride-8 feature map alone has `num_queries` positions:
    two-stage detectors (RT-DETR, Grounding DINO) pick their queries among them."""
    queries = _int(config, "num_queries", default=0)
    side = 8 * math.ceil(math.sqrt(queries))
    return 32 * math.ceil(side / 32)


def num_channels(config) -> int:
    return _int(vision_config(config), "num_channels", "in_channels", "in_chans", default=3)


def patch_size(config) -> int:
    return _int(vision_config(config), "patch_size", default=16)


# --------------------------------------------------------------------------- one image grid


def image_grid(context: InputContext) -> tuple[int, int, int, int]:
    """(images, t, h, w) in patches, shared by the patches, their grid and the merge sizes: each
    side two merged patches (`spatial_merge_size`), one temporal patch."""
    if "image_grid" not in context.shared:
        merge = _int(vision_config(context.config), *MERGE_NAMES, default=1)
        context.shared["image_grid"] = (context.batch, 1, 2 * merge, 2 * merge)
    return context.shared["image_grid"]


def flat_patches(context: InputContext) -> torch.Tensor:
    """[images * t * h * w, channels * temporal_patch * patch * patch], as a Qwen2-VL-style image
    processor makes them."""
    config = vision_config(context.config)
    images, t, h, w = image_grid(context)
    temporal = _int(config, *TEMPORAL_NAMES, default=1)
    width = num_channels(context.config) * temporal * patch_size(context.config) ** 2
    return torch.randn(images * t * h * w, width, generator=context.generator)


def _flat_grid(context: InputContext) -> tuple[int, int]:
    """(h, w) in patches of a NaFlex-style patch sequence: two pooling windows a side when the
    config pools patches (`pooling_kernel_size`), else its patch count as a square when it
    declares one, else 4 x 4."""
    pool = _int(vision_config(context.config), "pooling_kernel_size", default=0)
    if pool:
        return 2 * pool, 2 * pool
    count = _int(vision_config(context.config), "num_patches", default=16)
    side = max(1, int(count ** 0.5))
    return side, side


@input_builder("grid_thw", "image_grid_thw")
def build_grid_thw(context: InputContext) -> torch.Tensor:
    images, t, h, w = image_grid(context)
    return torch.tensor([[t, h, w]] * images, dtype=torch.long)


@input_builder("merge_sizes")
def build_merge_sizes(context: InputContext) -> torch.Tensor:
    merge = _int(vision_config(context.config), *MERGE_NAMES, default=1)
    return torch.full((image_grid(context)[0],), merge, dtype=torch.long)


@input_builder("spatial_shapes")
def build_spatial_shapes(context: InputContext) -> torch.Tensor:
    return torch.tensor([_flat_grid(context)] * context.batch, dtype=torch.long)


@input_builder("pixel_position_ids")
def build_pixel_position_ids(context: InputContext) -> torch.Tensor:
    """The (x, y) patch coordinates of each patch of the sequence, row by row."""
    h, w = _flat_grid(context)
    index = torch.arange(h * w)
    return torch.stack([index % w, index // w], dim=-1).expand(context.batch, -1, -1).clone()


@input_builder("pixel_attention_mask")
def build_pixel_attention_mask(context: InputContext) -> torch.Tensor:
    h, w = _flat_grid(context)
    return torch.ones(context.batch, h * w, dtype=torch.long)


# --------------------------------------------------------------------------- images


@input_builder("pixel_values", "prompt_pixel_values")
def build_pixel_values(context: InputContext) -> torch.Tensor:
    """Flattened patches when the forward takes their grid, a patch sequence when it takes
    `spatial_shapes` or `pixel_position_ids`, tiled images [batch, 1, tiles, ...] when the config declares
    `max_num_tiles`, clips when it declares `num_frames`, else a batch of images."""
    if context.takes(*GRID_INPUTS):
        return flat_patches(context)
    channels = num_channels(context.config)
    if context.takes(*SEQUENCE_INPUTS):
        h, w = _flat_grid(context)
        width = channels * patch_size(context.config) ** 2
        return torch.randn(context.batch, h * w, width, generator=context.generator)
    height, width = image_size(context.config)
    frames = _int(vision_config(context.config), "num_frames", default=0)
    tiles = _int(vision_config(context.config), "max_num_tiles", default=0)
    shape = (context.batch, 1, tiles) if tiles else (context.batch, frames) if frames else (context.batch,)
    return torch.randn(*shape, channels, height, width, generator=context.generator)


@input_builder("aspect_ratio_ids")
def build_aspect_ratio_ids(context: InputContext) -> torch.Tensor:
    """One image per sample, of the first supported aspect ratio (id 1: one tile)."""
    return torch.ones(context.batch, 1, dtype=torch.long)


@input_builder("aspect_ratio_mask")
def build_aspect_ratio_mask(context: InputContext) -> torch.Tensor:
    """The first tile of each image real, the others padding."""
    tiles = _int(vision_config(context.config), "max_num_tiles", default=1)
    mask = torch.zeros(context.batch, 1, tiles, dtype=torch.long)
    mask[:, :, 0] = 1
    return mask


@input_variants("pixel_values")
def pixel_values_layouts(context: InputContext, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Other layouts of the same pixels: clips as a batch of frames; images as one-frame clips
    or as pairs (image matchers); flattened patches as [patches, channels, (temporal,) p, p] or
    one batch of them."""
    if pixels.dim() == 5:
        return [pixels.flatten(0, 1)]
    if pixels.dim() == 4:
        return [pixels.unsqueeze(1), torch.stack([pixels, pixels.flip(0)], dim=1)]
    if pixels.dim() == 2:
        channels, patch = num_channels(context.config), patch_size(context.config)
        temporal = pixels.shape[1] // (channels * patch * patch)
        shaped = [pixels.reshape(-1, channels, patch, patch)] if temporal == 1 else []
        return shaped + [pixels.reshape(-1, channels, temporal, patch, patch), pixels.unsqueeze(0)]
    return []


@input_builder("image_attention_mask")
def build_image_attention_mask(context: InputContext) -> torch.Tensor:
    """Every text token sees the sample's one image."""
    return torch.ones(context.batch, context.seq, 1, dtype=torch.long)


@input_builder("prompt_masks")
def build_prompt_masks(context: InputContext) -> torch.Tensor:
    height, width = image_size(context.config)
    return torch.ones(context.batch, num_channels(context.config), height, width)


@input_builder("pixel_mask")
def build_pixel_mask(context: InputContext) -> torch.Tensor:
    """Every pixel real (no padding)."""
    return torch.ones(context.batch, *image_size(context.config), dtype=torch.long)


@input_builder("hidden_states")
def build_hidden_states(context: InputContext) -> torch.Tensor | None:
    """Flattened image patches for a vision tower that takes them with their grid, else a
    [batch, seq, hidden_size] sequence of features."""
    if context.takes(*GRID_INPUTS):
        return flat_patches(context)
    hidden = getattr(context.config, "hidden_size", None)
    if not isinstance(hidden, int):
        return None
    return torch.randn(context.batch, context.seq, hidden, generator=context.generator)


@input_builder("query_embeds")
def build_query_embeds(context: InputContext) -> torch.Tensor | None:
    hidden = getattr(context.config, "hidden_size", None)
    if not isinstance(hidden, int):
        return None
    queries = _int(context.config, "num_query_tokens", default=context.seq)
    return torch.randn(context.batch, queries, hidden, generator=context.generator)


@input_builder("qformer_input_ids")
def build_qformer_input_ids(context: InputContext) -> torch.Tensor | None:
    qformer = getattr(context.config, "qformer_config", None)
    if qformer is None:
        return None
    return token_ids(qformer, (context.batch, context.seq), context.generator)


# --------------------------------------------------------------------------- layout and regions


def boxes(context: InputContext, count: int, scale: int) -> torch.Tensor:
    """[batch, count, 4] boxes (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, in [0, scale)."""
    corners = torch.randint(0, scale, (context.batch, count, 2, 2), generator=context.generator)
    low, high = corners.min(dim=2).values, corners.max(dim=2).values
    return torch.cat([low, high], dim=-1)


@input_builder("bbox")
def build_bbox(context: InputContext) -> torch.Tensor:
    """One box per token, in the layout models' 0..1000 page coordinates (kept below the
    config's `max_2d_position_embeddings`)."""
    scale = min(1000, _int(context.config, "max_2d_position_embeddings", default=1000))
    return boxes(context, context.seq, scale)


@input_builder("visual_feats")
def build_visual_feats(context: InputContext) -> torch.Tensor | None:
    width = getattr(context.config, "visual_feat_dim", None)
    if not isinstance(width, int):
        return None
    return torch.randn(context.batch, NUM_BOXES, width, generator=context.generator)


@input_builder("visual_pos")
def build_visual_pos(context: InputContext) -> torch.Tensor | None:
    width = getattr(context.config, "visual_pos_dim", None)
    if not isinstance(width, int):
        return None
    return torch.rand(context.batch, NUM_BOXES, width, generator=context.generator)
