"""Training-only settings do not block a stock checkpoint; settings that change inference do."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

import upcycle_fx
from upcycle_fx import HFFormatError
from upcycle_fx.exporters.hf_moe import TrainingOnlySettingWarning
from upcycle_fx.report import relative_error
from upcycle_fx.testing.zoo import _decoder_cfg

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def upcycled_llama(pattern="every_other_mlp", **settings):
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_decoder_cfg())).eval()
    options = dict(num_experts=4, top_k=2, router_init_std=1.0, seed=0)
    return upcycle_fx.rewrite(dense, pattern, **{**options, **settings}).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_z_loss_model_ships_with_its_aux_weight_and_a_note(tmp_path):
    """A model trained with z-loss is written (z-loss dropped with a TrainingOnlySettingWarning,
    inference unchanged: logits within 1e-5) and its aux weight becomes router_aux_loss_coef."""
    model = upcycled_llama(z_loss_weight=0.1, aux_loss_weight=0.03)
    with pytest.warns(TrainingOnlySettingWarning, match="z-loss weight 0.1"):
        upcycle_fx.save(model, tmp_path / "hf", format="hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["router_aux_loss_coef"] == pytest.approx(0.03)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    assert relative_error(logits(loaded, ids), logits(model, ids)) <= 1e-5


def test_per_layer_aux_weights_ship_with_the_first_layers(tmp_path):
    model = upcycled_llama("all")
    for i, (_, moe) in enumerate(upcycle_fx.moe_layers(model)):
        moe.settings = dataclasses.replace(moe.settings, aux_loss_weight=0.01 * (i + 1))
    with pytest.warns(TrainingOnlySettingWarning, match="per-layer auxiliary loss weights"):
        upcycle_fx.save(model, tmp_path / "hf", format="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["router_aux_loss_coef"] == pytest.approx(0.01)


def test_capacity_limits_still_refused(tmp_path):
    """A capacity limit drops tokens at inference: no stock format can express it."""
    model = upcycled_llama(capacity_factor=1.5, verify=False)
    with pytest.raises(HFFormatError, match="capacity_factor 1.5"):
        upcycle_fx.save(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists()
