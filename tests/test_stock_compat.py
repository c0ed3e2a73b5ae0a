"""Stock checkpoints for other transformers versions: every config field written explicitly, in
the spellings older versions read. Loading in transformers 4.57 itself needs that version
installed (a download), so it is a documented command, not a test: python benchmarks/hf_compat.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

import upcycle_fx
from upcycle_fx.testing.zoo import _decoder_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import hf_compat  # noqa: E402  (benchmarks/hf_compat.py: the cross-version check)

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def written_config(tmp_path, family, pattern, **overrides) -> dict:
    torch.manual_seed(0)
    config = getattr(transformers, f"{family}Config")(**_decoder_cfg(**overrides))
    dense = getattr(transformers, f"{family}ForCausalLM")(config)
    model = upcycle_fx.rewrite(dense, pattern, num_experts=4, top_k=2, seed=0)
    upcycle_fx.save(model, tmp_path / "hf", format="hf")
    return json.loads((tmp_path / "hf" / "config.json").read_text())


def test_mixtral_config_names_rope_theta_although_it_is_this_versions_default(tmp_path):
    """Llama's rope_theta 10000 is Mixtral's default in transformers 5 but not in 4.57 (1e6):
    it must be written, in the legacy spelling as well as in rope_parameters."""
    config = written_config(tmp_path, "Llama", "all")
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert config["torch_dtype"] == config["dtype"] == "float32"


def test_rope_scaling_and_renamed_fields_in_their_legacy_form(tmp_path):
    config = written_config(tmp_path, "Qwen3", "all", head_dim=32, rope_theta=1000.0,
                            rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert config["rope_theta"] == 1000.0
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert config["num_experts"] == config["num_local_experts"] == 4  # 4.57 reads num_experts
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path / "hf")  # and this version agrees
    assert reloaded.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0}


def test_cross_version_check_passes_with_the_installed_transformers(tmp_path):
    """benchmarks/hf_compat.py's cases (Mixtral / Qwen2-MoE / Qwen3-MoE outputs, loaded in a fresh
    child process, every key used, logits within 1e-5) pass with the transformers installed here;
    its documented run does the same with transformers 4.57 installed into --target."""
    (tmp_path / "site").mkdir()
    report = hf_compat.load_in(tmp_path / "site", hf_compat.write_cases(tmp_path / "out"))
    assert report["transformers"] == transformers.__version__
    assert report["results"] and all(hf_compat.passed(r) for r in report["results"]), hf_compat.render(report)
