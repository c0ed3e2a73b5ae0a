"""The architecture sweep (benchmarks/hf_sweep.py) on a representative sample: its own code path,
child process included, gives what the committed docs/coverage.md reports."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import hf_sweep  # noqa: E402  (benchmarks/hf_sweep.py: the coverage sweep)

CONVERTED = ("llama", "gpt2", "bert", "t5")
# Multimodal ones, on inputs built from their configs: an image classifier, a CLIP-style dual
# encoder (text and images), a Qwen-VL (multimodal rotary sections), a patch-grid vision tower.
MULTIMODAL = ("clip", "chinese_clip", "qwen2_5_vl", "glm_image_vision")
NAMED_ERROR = {"segformer": "NoMLPFoundError", "esm": "CaptureError"}  # Mix-FFN; pad_token_id None
SAMPLE = CONVERTED + tuple(NAMED_ERROR)


def committed_results() -> dict[str, str]:
    """architecture -> result, from the table rows of docs/coverage.md."""
    rows = {}
    for line in (ROOT / "docs" / "coverage.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[2] in hf_sweep.RESULTS:
            rows[cells[0]] = cells[2]
    return rows


@pytest.fixture(scope="module")
def records() -> dict[str, dict]:
    return {r["architecture"]: r for r in hf_sweep.run_sweep(list(SAMPLE + MULTIMODAL), timeout=120)}


@pytest.mark.parametrize("architecture", CONVERTED + MULTIMODAL)
def test_converts_with_the_function_preserved(records, architecture):
    record = records[architecture]
    assert record["result"] == "converted", record
    assert record["moe_layers"] >= 1 and record["ffns_found"] >= record["moe_layers"]
    assert record["verified_error"] is not None and record["verified_error"] <= 1e-5
    assert record["params_after"] > record["params_before"]


@pytest.mark.parametrize("architecture", sorted(NAMED_ERROR))
def test_unsupported_ones_end_in_a_named_error(records, architecture):
    record = records[architecture]
    assert record["result"] == "named error", record
    assert record["error"].startswith(NAMED_ERROR[architecture] + ":")


def test_the_committed_table_reports_the_same(records):
    committed = committed_results()
    assert {a: committed.get(a) for a in SAMPLE} == {a: records[a]["result"] for a in SAMPLE}


def test_moe_configs_are_skipped_before_building():
    record = hf_sweep.sweep_one("mixtral")
    assert record["result"] == "already MoE" and "experts" in record["error"]


def test_tiny_config_shrinks_nested_configs_and_keeps_token_ids_in_the_vocabulary():
    t5 = hf_sweep.tiny_config("t5")
    assert (t5.num_layers, t5.d_model, t5.d_ff, t5.vocab_size) == (2, 64, 128, 256)
    gpt2 = hf_sweep.tiny_config("gpt2")  # bos / eos 50256 by default
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.vocab_size) == (2, 64, 256)
    assert gpt2.bos_token_id < 256 and gpt2.eos_token_id < 256
    clip = hf_sweep.tiny_config("clip")
    assert clip.vision_config.hidden_size == clip.text_config.hidden_size == 64
    assert clip.vision_config.image_size == hf_sweep.IMAGE_SIZE


def test_tiny_config_keeps_multimodal_rotary_sections_inside_the_head():
    text = hf_sweep.tiny_config("qwen2_vl").text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2


def test_tiny_config_keeps_whole_windows_in_every_swin_stage():
    swin = hf_sweep.tiny_config("swin")
    last_stage = swin.image_size // swin.patch_size // 2 ** (len(swin.depths) - 1)
    assert last_stage >= swin.window_size


def test_tiny_config_fits_partial_rotary_and_latent_attention_heads():
    gptj = hf_sweep.tiny_config("gptj")
    assert gptj.rotary_dim <= gptj.n_embd // gptj.n_head
    youtu = hf_sweep.tiny_config("youtu")
    assert youtu.head_dim == youtu.qk_rope_head_dim
    assert youtu.num_key_value_heads == youtu.num_attention_heads


def test_tiny_config_folds_layer_indices_into_the_tiny_depth():
    vision = hf_sweep.tiny_config("mllama_vision_model")
    assert len(vision.intermediate_layers_indices) == 5  # the width of its output depends on the count
    assert max(vision.intermediate_layers_indices) < vision.num_hidden_layers


def test_the_timeout_does_not_count_the_child_process_imports():
    """The child says it is ready once torch, transformers and upcycle_fx are imported, before
    it takes its first model; Worker() waits for that, so a restart's imports are not charged to
    the next model's timeout."""
    class Connection:
        sent: list = []

        def send(self, message):
            self.sent.append(message)

        def recv(self):
            return None  # no model: the child returns

    try:
        hf_sweep._worker(Connection())
    finally:
        logging.disable(logging.NOTSET)  # the child's setting, undone for the tests that follow
    assert Connection.sent == [hf_sweep.READY]
