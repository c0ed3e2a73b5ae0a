"""--format hf: stock transformers MoE checkpoints that load without remote code and compute the
upcycled model's logits, or a named refusal when the input cannot be expressed exactly."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import upcycle_fx
from upcycle_fx import HFFormatError
from upcycle_fx.report import relative_error
from upcycle_fx.testing.zoo import _decoder_cfg

# transformers warns when it builds Qwen2-MoE's zero-width shared expert (see hf_moe.py)
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

TOLERANCE = 1e-5  # relative, float32 (DESIGN §8)


def dense(kind: str, **config) -> torch.nn.Module:
    """A tiny seeded dense causal LM of `kind` (4 layers, d=64, d_ff=160)."""
    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{names}Config")(**_decoder_cfg(**config))
    return getattr(transformers, f"{names}ForCausalLM")(cfg).eval()


def upcycled(model, pattern="every_other_mlp", **kwargs):
    options = dict(num_experts=4, top_k=2, router_init_std=1.0, seed=0)
    return upcycle_fx.rewrite(model, pattern, **{**options, **kwargs}).eval()


def write_and_load(model, directory, **kwargs):
    """save(format="hf"), then load as any user would: AutoModelForCausalLM, no remote code."""
    upcycle_fx.save(model, directory, format="hf", **kwargs)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return loaded.eval(), json.loads((directory / "config.json").read_text())


def logits_error(a, b, seq=12) -> float:
    ids = torch.randint(4, 256, (2, seq), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return relative_error(a(input_ids=ids).logits, b(input_ids=ids).logits)


CASES = [  # (family, config overrides, pattern, expected class, expected sparse layout)
    ("llama", {}, "every_other_mlp", "Qwen2MoeForCausalLM", (2, [])),
    ("llama", {}, "all", "MixtralForCausalLM", None),
    ("llama", {}, [0, 1, 3], "Qwen2MoeForCausalLM", (1, [2])),
    ("mistral", {"sliding_window": 4}, "every_other_mlp", "Qwen2MoeForCausalLM", (2, [])),
    ("mistral", {"sliding_window": 4}, "all", "MixtralForCausalLM", None),
    ("qwen2", {}, "every_other_mlp", "Qwen2MoeForCausalLM", (2, [])),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}, "all",
     "Qwen2MoeForCausalLM", (1, [])),
    ("qwen3", {"head_dim": 32}, "every_other_mlp", "Qwen3MoeForCausalLM", (2, [])),
    ("qwen3", {"head_dim": 32, "attention_bias": True}, "all", "Qwen3MoeForCausalLM", (1, [])),
    ("llama", {"tie_word_embeddings": True, "head_dim": 32,
               "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "all", "MixtralForCausalLM", None),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
               "rope_theta": 500000.0}, "every_other_mlp", "Qwen2MoeForCausalLM", (2, [])),
]


@pytest.mark.parametrize("kind, overrides, pattern, architecture, sparse", CASES)
def test_stock_checkpoint_gives_the_upcycled_logits(kind, overrides, pattern, architecture, sparse, tmp_path):
    """Loads as the stock class with every tensor used, and its logits equal the upcycled model's
    to <= 1e-5 relative (sequence 12 > sliding window 4, so windows are exercised)."""
    model = upcycled(dense(kind, **overrides), pattern)
    loaded, config = write_and_load(model, tmp_path / "hf")
    assert type(loaded).__name__ == architecture == config["architectures"][0]
    assert logits_error(loaded, model) <= TOLERANCE
    source = model.config
    assert config["num_experts_per_tok"] == 2 and config["rope_parameters"] == source.rope_parameters
    assert config["tie_word_embeddings"] == source.tie_word_embeddings
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == source.tie_word_embeddings
    if sparse is None:
        assert config["num_local_experts"] == 4
    else:
        assert (config["decoder_sparse_step"], config["mlp_only_layers"]) == sparse
        experts = config.get("num_experts", config.get("num_local_experts"))  # Qwen3-MoE saves the latter
        assert config["norm_topk_prob"] is True and experts == 4
    if architecture == "Qwen2MoeForCausalLM":
        assert config["shared_expert_intermediate_size"] == 0


def test_renormalisation_off_is_carried_as_norm_topk_prob(tmp_path):
    """normalize_weights=False changes the function; the Qwen2-MoE output (norm_topk_prob=False)
    reproduces exactly that changed function."""
    base = dense("llama")
    model = upcycled(base, normalize_weights=False)
    loaded, config = write_and_load(model, tmp_path / "hf")
    assert config["norm_topk_prob"] is False
    assert logits_error(loaded, model) <= TOLERANCE
    assert logits_error(loaded, base) > 1e-3  # really a different function from the dense one


def test_tensors_are_stored_as_transformers_stores_them(tmp_path):
    """The file layout is what save_pretrained writes (per-expert Mixtral w1/w2/w3, Qwen
    experts.{i}.gate_proj ...), so tools reading the hub layout find their names."""
    model = upcycled(dense("llama"), "all")
    loaded, _ = write_and_load(model, tmp_path / "ours")
    loaded.save_pretrained(tmp_path / "theirs")
    ours = sorted(_keys(tmp_path / "ours"))
    assert ours == sorted(_keys(tmp_path / "theirs"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in ours


def _keys(directory):
    from safetensors import safe_open

    keys = []
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            keys += list(handle.keys())
    return keys


def test_bfloat16_model_is_written_in_bfloat16(tmp_path):
    model = upcycled(dense("qwen3", head_dim=32)).to(torch.bfloat16)
    loaded, config = write_and_load(model, tmp_path / "hf")
    assert config["dtype"] == "bfloat16" and loaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert logits_error(loaded, model) <= 5e-2  # bf16; the router runs in bf16 there, float32 here


REFUSALS = [
    ("llama", {"attention_bias": True}, "all", {}, "attention biases: Mixtral"),
    ("llama", {"attention_bias": True}, "every_other_mlp", {}, "bias on o_proj, which Qwen2-MoE lacks"),
    ("llama", {"mlp_bias": True}, "every_other_mlp", {}, "biases"),
    ("qwen2", {}, "all", {"hf_target": "mixtral"}, "mixtral can only be written from llama/mistral"),
    ("llama", {}, "every_other_mlp", {"hf_target": "mixtral"}, "only layers \\[1, 3\\] were converted"),
    ("llama", {}, "every_other_mlp", {"hf_target": "qwen3_moe"}, "qwen3_moe can only be written from qwen3"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}, "all", {},
     "sliding window on some layers only"),
]


@pytest.mark.parametrize("kind, overrides, pattern, options, message", REFUSALS)
def test_what_the_target_cannot_express_is_refused(kind, overrides, pattern, options, message, tmp_path):
    """Biases the target lacks, per-layer windows it cannot express, wrong family or layers:
    HFFormatError naming it and suggesting --format native; nothing is written."""
    model = upcycled(dense(kind, **overrides), pattern)
    with pytest.raises(HFFormatError, match=message):
        upcycle_fx.save(model, tmp_path / "hf", format="hf", **options)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("settings, message", [
    ({"capacity_factor": 1.5}, "dropless"),
    ({"routing": "expert_choice"}, "top-k only"),
])
def test_routing_the_target_lacks_is_refused(settings, message, tmp_path):
    model = upcycled(dense("llama"), verify=False, **settings)
    with pytest.raises(HFFormatError, match=message):
        upcycle_fx.save(model, tmp_path / "hf", format="hf")


def test_mixtral_cannot_skip_renormalisation(tmp_path):
    model = upcycled(dense("mistral"), "all", normalize_weights=False)
    with pytest.raises(HFFormatError, match="Mixtral always renormalises"):
        upcycle_fx.save(model, tmp_path / "hf", format="hf")


def test_unknown_config_fields_are_refused(tmp_path):
    """A field the translation does not know might change the function: refused by name."""
    base = dense("llama")
    base.config.my_custom_scaling = 3.0
    with pytest.raises(HFFormatError, match="my_custom_scaling"):
        upcycle_fx.save(upcycled(base), tmp_path / "hf", format="hf")


def test_unsupported_families_are_refused(tmp_path):
    from helpers import build

    with pytest.raises(HFFormatError, match="supported inputs: LlamaForCausalLM"):
        upcycle_fx.save(upcycled(build("gpt2")), tmp_path / "hf", format="hf")
    with pytest.raises(HFFormatError, match="not a transformers model"):
        upcycle_fx.save(upcycled(build("hw-swiglu")), tmp_path / "hf", format="hf")
