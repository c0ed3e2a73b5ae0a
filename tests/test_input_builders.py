"""Example inputs built from a Hugging Face model's config: every input the forward needs, in
the shapes the (vision) config declares, and a named CaptureError when they cannot be built or
the model does not run on them."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

import upcycle_fx
from upcycle_fx import CaptureError
from upcycle_fx.capture.input_builders import InputContext
from upcycle_fx.capture.inputs import hf_example_inputs
from upcycle_fx.capture.vision_inputs import build_bbox, image_size

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_clip() -> transformers.CLIPModel:
    config = transformers.CLIPConfig(
        text_config=dict(TINY, vocab_size=99, max_position_embeddings=16),
        vision_config=dict(TINY, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    return transformers.CLIPModel(config).eval()


def test_a_clip_style_model_gets_text_and_images_of_its_vision_config_size():
    inputs = hf_example_inputs(tiny_clip())
    assert inputs.kwargs["input_ids"].shape == (2, 8)
    assert inputs.kwargs["pixel_values"].shape == (2, 3, 32, 32)  # vision_config.image_size, not 224


def test_a_clip_style_model_converts_with_its_function_preserved():
    config = upcycle_fx.UpcycleConfig(pattern="every_other_mlp", num_experts=4, top_k=2, seed=0)
    result = upcycle_fx.upcycle(tiny_clip(), config)
    assert len(upcycle_fx.moe_layers(result.model)) >= 1
    assert result.verified_error is not None and result.verified_error <= 1e-5


def test_a_patch_grid_vision_tower_gets_flattened_patches_and_their_grid():
    """Qwen2.5-VL's vision tower: forward(hidden_states, grid_thw), main_input_name input_ids."""
    config = transformers.Qwen2_5_VLVisionConfig(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=32, patch_size=8,
        temporal_patch_size=2, spatial_merge_size=2, fullatt_block_indexes=[1])
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VisionTransformerPretrainedModel(config).eval()
    inputs = hf_example_inputs(model)
    assert inputs.kwargs["grid_thw"].tolist() == [[1, 4, 4]] * 2
    assert inputs.kwargs["hidden_states"].shape == (2 * 16, 3 * 2 * 8 * 8)
    assert "input_ids" not in inputs.kwargs


def test_a_video_tower_gets_clips_of_the_declared_frame_count():
    config = transformers.VideoMAEConfig(**TINY, image_size=32, patch_size=8, num_frames=4, tubelet_size=2)
    inputs = hf_example_inputs(transformers.VideoMAEModel(config).eval())
    assert inputs.kwargs["pixel_values"].shape == (2, 4, 3, 32, 32)


def test_a_tower_that_takes_frames_as_images_gets_them_flattened():
    """XCLIP's vision tower declares num_frames but takes [batch * frames, C, H, W]: the clip
    layout is refused, the frames layout runs."""
    config = transformers.XCLIPVisionConfig(**TINY, image_size=32, patch_size=8, num_frames=2,
                                            mit_hidden_size=32, mit_intermediate_size=64)
    inputs = hf_example_inputs(transformers.XCLIPVisionModel(config).eval())
    assert inputs.kwargs["pixel_values"].shape == (4, 3, 32, 32)


def test_float_inputs_take_the_model_dtype():
    config = transformers.ViTConfig(**TINY, image_size=32, patch_size=8)
    model = transformers.ViTModel(config).to(torch.bfloat16).eval()
    assert hf_example_inputs(model).kwargs["pixel_values"].dtype == torch.bfloat16


def test_layout_boxes_are_ordered_corners_in_page_coordinates():
    context = InputContext(None, PretrainedConfig(max_2d_position_embeddings=1024),
                           torch.Generator().manual_seed(0))
    boxes = build_bbox(context)
    assert boxes.shape == (2, 8, 4) and boxes.min() >= 0 and boxes.max() < 1000
    assert (boxes[..., 0] <= boxes[..., 2]).all() and (boxes[..., 1] <= boxes[..., 3]).all()


def test_a_two_stage_detector_gets_images_with_room_for_its_queries():
    """RT-DETR picks num_queries among the stride-8 positions: 64 x 64 images hold only 64."""
    height, width = image_size(PretrainedConfig(num_queries=300))
    assert (height // 8) * (width // 8) >= 300


class _Config(PretrainedConfig):
    model_type = "needs_a_session"
    vocab_size = 32


class _NeedsSession(PreTrainedModel):
    config_class = _Config

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(32, 8)

    def forward(self, input_ids, inference_session, return_dict=None):
        return self.embed(input_ids)


class _RefusesIds(_NeedsSession):
    def forward(self, input_ids=None, return_dict=None):
        raise ValueError("You have to specify the audio features")


def test_a_required_input_no_builder_knows_is_a_named_error_that_asks_for_example_inputs():
    with pytest.raises(CaptureError, match=r"'inference_session'.*example_inputs="):
        hf_example_inputs(_NeedsSession(_Config()))


def test_inputs_the_model_refuses_are_a_named_error_saying_which_and_why():
    with pytest.raises(CaptureError) as caught:
        hf_example_inputs(_RefusesIds(_Config()))
    message = str(caught.value)
    assert "input_ids [2, 8]" in message and "You have to specify the audio features" in message
    assert "example_inputs=" in message


def test_a_pooled_patch_sequence_gets_positions_that_match_its_patches():
    """Gemma 4's vision tower: forward(pixel_values [batch, patches, C*p*p], pixel_position_ids)."""
    from upcycle_fx.capture.input_builders import BUILDERS

    config = PretrainedConfig(patch_size=8, pooling_kernel_size=3)
    context = InputContext(None, config, torch.Generator().manual_seed(0),
                           parameters=("pixel_values", "pixel_position_ids"))
    pixels, positions = BUILDERS["pixel_values"](context), BUILDERS["pixel_position_ids"](context)
    assert pixels.shape == (2, 36, 3 * 8 * 8) and positions.shape == (2, 36, 2)
    assert positions[0, 7].tolist() == [1, 1]  # row by row in a 6 x 6 grid: two pooling windows a side
