"""Stock checkpoints for other transformers versions: every config field written explicitly, in
the spellings older versions read, and (slow) loading in transformers 4.57 itself."""

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


@pytest.mark.slow
def test_outputs_load_with_the_same_logits_in_transformers_4_57(tmp_path):
    """benchmarks/hf_compat.py: pip-installs transformers 4.57 into tmp_path (about 30 s, 60 MB)
    and loads Mixtral / Qwen2-MoE / Qwen3-MoE outputs there: every key used and logits within
    1e-5. Skipped only when pip cannot get that version (no reachable index: offline machines)."""
    try:
        report = hf_compat.check("4.57.*", tmp_path / "site", tmp_path / "out")
    except hf_compat.InstallError as error:
        text = str(error)
        offline = ("No matching distribution", "Could not find a version", "connection", "Network is unreachable",
                   "Max retries", "Temporary failure in name resolution")
        if any(word.lower() in text.lower() for word in offline):
            pytest.skip(f"pip cannot reach an index with transformers 4.57: {text[-300:]}")
        raise
    assert report["transformers"].startswith("4.57.")
    assert report["passed"], hf_compat.render(report)
