"""Example inputs built from the config of speech, audio, time-series, video and vector-input
Hugging Face models: `upcycle` converts them with no example_inputs, verified against the dense
model; where no built input runs, a CaptureError names the input and asks for example_inputs=."""

from __future__ import annotations

import pytest
import torch
import transformers

import upcycle_fx
from upcycle_fx import CaptureError, UpcycleConfig
from upcycle_fx.capture.inputs import hf_example_inputs

TOLERANCE = 1e-5  # relative, float32 (DESIGN §8)
OPTIONS = dict(pattern="every_other_mlp", num_experts=4, top_k=2, seed=0)
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def tiny(config_name: str, model_name: str, **config) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(transformers, model_name)(getattr(transformers, config_name)(**config)).eval()


def converts(model: torch.nn.Module) -> upcycle_fx.UpcycleResult:
    """Upcycle with the inputs built from the config; the check against the dense model passed."""
    result = upcycle_fx.upcycle(model, UpcycleConfig(**OPTIONS))
    assert upcycle_fx.moe_layers(result.model)
    assert result.verified_error is not None and result.verified_error <= TOLERANCE
    return result


def wav2vec2() -> torch.nn.Module:
    return tiny("Wav2Vec2Config", "Wav2Vec2Model", **TINY, conv_dim=(16, 16), conv_kernel=(10, 3),
                conv_stride=(5, 2), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2)


def test_waveform_long_enough_for_the_conv_feature_encoder():
    inputs = hf_example_inputs(wav2vec2()).kwargs
    # 16 frames out of kernels (10, 3) and strides (5, 2): (16 - 1) * 2 + 3 = 33, (33 - 1) * 5 + 10 = 170
    assert tuple(inputs["input_values"].shape) == (2, 170)


def test_wav2vec2_converts_on_a_built_waveform():
    converts(wav2vec2())


def test_whisper_style_features_are_mel_first_and_as_long_as_the_encoder_needs():
    model = tiny("WhisperConfig", "WhisperModel", d_model=32, encoder_layers=1, decoder_layers=1,
                 encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                 decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=24, vocab_size=64,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    inputs = hf_example_inputs(model).kwargs
    assert tuple(inputs["input_features"].shape) == (2, 16, 48)  # [batch, mel, 2 x max_source_positions]
    assert tuple(inputs["decoder_input_ids"].shape)[0] == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_built_inputs_take_the_model_dtype(dtype):
    """A half-precision speech model gets features in its own dtype, and converts."""
    model = wav2vec2().to(dtype)
    assert hf_example_inputs(model).kwargs["input_values"].dtype == dtype
    result = upcycle_fx.upcycle(model, UpcycleConfig(**OPTIONS))
    assert upcycle_fx.moe_layers(result.model) and result.verified_error is not None


def test_conformer_features_are_frames_first_and_convert():
    model = tiny("ParakeetEncoderConfig", "ParakeetEncoder", **TINY, num_mel_bins=16,
                 subsampling_conv_channels=8)
    inputs = hf_example_inputs(model).kwargs
    assert inputs["input_features"].shape[-1] == 16  # [batch, frames, mel]
    converts(model)


def test_patchtst_converts_on_built_past_values():
    model = tiny("PatchTSTConfig", "PatchTSTModel", d_model=32, num_hidden_layers=2,
                 num_attention_heads=2, ffn_dim=64, context_length=32, patch_length=4,
                 patch_stride=4, num_input_channels=3)
    assert tuple(hf_example_inputs(model).kwargs["past_values"].shape) == (2, 32, 3)
    converts(model)


def test_decision_transformer_converts_on_built_trajectories():
    model = tiny("DecisionTransformerConfig", "DecisionTransformerModel", state_dim=5, act_dim=3,
                 hidden_size=32, n_layer=2, n_head=2, max_ep_len=50)
    converts(model)


def test_mae_random_masking_is_the_same_for_dense_and_upcycled():
    """ViT-MAE masks patches at random in every forward: the check compares both models under
    one random state instead of reporting the masks' difference as a wrong rewrite."""
    model = tiny("ViTMAEConfig", "ViTMAEModel", **TINY, image_size=32, patch_size=8)
    converts(model)


class _Refusing(transformers.Wav2Vec2Model):
    def forward(self, input_values, **kwargs):
        raise ValueError("this forward takes nothing")


def test_no_layout_runs_names_the_input_and_asks_for_example_inputs():
    torch.manual_seed(0)
    model = _Refusing(wav2vec2().config).eval()
    with pytest.raises(CaptureError, match=r"'input_values'.*this forward takes nothing.*example_inputs="):
        upcycle_fx.upcycle(model, UpcycleConfig(**OPTIONS))


def test_a_config_whose_property_raises_is_a_capture_error_not_a_crash():
    """Some configs validate in a property (WavTokenizer's `encoder_config`); a builder that reads
    it must end in a named CaptureError that says so."""
    import transformers

    import upcycle_fx

    config = transformers.Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_feat_extract_layers=2)
    model = transformers.Wav2Vec2Model(config).eval()

    class Refusing(type(config)):
        @property
        def encoder(self):
            raise ValueError("codebook_dim must equal hidden_size")

    model.config.__class__ = Refusing
    with pytest.raises(upcycle_fx.CaptureError, match="reading its config failed: ValueError: codebook_dim"):
        upcycle_fx.find_mlps(model)
