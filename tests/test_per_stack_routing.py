"""Routing per stack, as in the sparse upcycling paper: expert choice in the encoder, top-k in
the decoder (`routing={"encoder": "expert_choice", "decoder": "top_k"}`), per FFN index, or by a
callable; checked before any work, kept by save / load and save_pretrained / from_pretrained,
and taken by the command line (flag and recipe)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

import upcycle_fx
from upcycle_fx import UpcycleConfig
from upcycle_fx.errors import RewriteError, UpcycleConfigError
from upcycle_fx.passes.stack_routing import NonCausalRoutingWarning
from upcycle_fx.report import relative_error

from cli_models import run_cli

PAPER = {"encoder": "expert_choice", "decoder": "top_k"}
TOLERANCE = 1e-5  # float32, function-preserving layers


def t5() -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


def t5_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 64, (2, 7), generator=generator),
            "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=generator)}


def bart() -> transformers.BartForConditionalGeneration:
    config = transformers.BartConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4,
                                     encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1, forced_eos_token_id=2)
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(config).eval()


def whisper() -> transformers.WhisperForConditionalGeneration:
    config = transformers.WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=4, decoder_attention_heads=4,
                                        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                                        max_source_positions=16, max_target_positions=16, pad_token_id=0,
                                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    torch.manual_seed(0)
    return transformers.WhisperForConditionalGeneration(config).eval()


def whisper_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"input_features": torch.randn(2, 16, 32, generator=generator),
            "decoder_input_ids": torch.randint(0, 64, (2, 5), generator=generator)}


def routings(model) -> list[tuple[str, str]]:
    return [(name.split(".")[0], moe.settings.routing) for name, moe in upcycle_fx.moe_layers(model)]


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def paper_t5():
    return upcycle_fx.rewrite(t5(), pattern="all", num_experts=4, routing=PAPER, seed=0)


# --------------------------------------------------------------------------- per stack on T5


def test_t5_expert_choice_in_the_encoder_top_k_in_the_decoder():
    """Each layer gets its stack's routing; the top-k layers still compute the dense FFN exactly
    (copies, renormalised weights), while the expert-choice ones change it by design."""
    dense = t5()
    model = paper_t5()
    assert routings(model) == [("encoder", "expert_choice")] * 2 + [("decoder", "top_k")] * 2
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    for stack, i in (("decoder", 0), ("decoder", 1)):
        moe = getattr(model, stack).block[i].layer[2].DenseReluDense
        ffn = getattr(dense, stack).block[i].layer[2].DenseReluDense
        with torch.no_grad():
            assert relative_error(moe(x), ffn(x)) <= TOLERANCE
    assert not torch.equal(logits(model, t5_inputs()), logits(dense, t5_inputs()))


def test_a_mapping_of_top_k_everywhere_preserves_the_function():
    dense = t5()
    model = upcycle_fx.rewrite(dense, pattern="all", num_experts=4, routing={"encoder": "top_k", "decoder": "top_k"})
    assert relative_error(logits(model, t5_inputs()), logits(dense, t5_inputs())) <= TOLERANCE


@pytest.mark.parametrize("routing, expected", [
    ({"encoder.block": "expert_choice"}, ["expert_choice", "expert_choice", "top_k", "top_k"]),
    ({"block": "expert_choice"}, ["expert_choice"] * 4),
    ({"encoder": "expert_choice", 1: "top_k"}, ["expert_choice", "top_k", "top_k", "top_k"]),
    ({3: "expert_choice"}, ["top_k", "top_k", "top_k", "expert_choice"]),
    (lambda m: "expert_choice" if m.stack.startswith("encoder") else "top_k",
     ["expert_choice", "expert_choice", "top_k", "top_k"]),
])
def test_stacks_by_path_or_part_ffns_by_index_or_callable(routing, expected):
    """A stack is named by its path or a part of it; an index key wins; unnamed FFNs get top_k."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NonCausalRoutingWarning)
        model = upcycle_fx.rewrite(t5(), pattern="all", num_experts=4, routing=routing)
    assert [r for _, r in routings(model)] == expected


# --------------------------------------------------------------------------- errors before any work


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the rewrite gets as far as sizing, copying or converting the model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the rewrite started before the error")
    monkeypatch.setattr("upcycle_fx.api._check_memory", refuse)
    monkeypatch.setattr("upcycle_fx.api.upcycle_matches", refuse)


@pytest.mark.parametrize("routing, pattern, message", [
    ({"vision": "top_k"}, "all", "routing key 'vision' names no stack of T5ForConditionalGeneration: its "
                                 "stacks of blocks are encoder.block, decoder.block"),
    ({"block": "top_k", "decoder": "expert_choice"}, "all", "ask for different routings"),
    ({0: "expert_choice"}, [1, 2], "routing keys [0] are FFN indices that pattern=[1, 2] does not convert"),
    (lambda m: "sideways", "all", "returned 'sideways' for FFN #0"),
    (lambda m: m.missing, "all", "raised AttributeError"),
])
def test_routing_that_does_not_fit_the_model_is_refused_before_any_work(no_work, routing, pattern, message):
    model = t5()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UpcycleConfigError) as error:
        upcycle_fx.rewrite(model, pattern=pattern, num_experts=4, routing=routing)
    assert message in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("routing, message", [
    ({}, "names no stack"),
    ({"encoder": "sideways"}, "routing['encoder']='sideways' is unknown"),
    ({True: "top_k"}, "routing key True"),
    ({-1: "top_k"}, "routing key -1"),
    ({"": "top_k"}, "routing key ''"),
    ({1.5: "top_k"}, "routing key 1.5"),
    (3, "routing=3 is unknown"),
    (None, "routing=None is unknown"),
])
def test_config_checks_the_routing_without_the_model(routing, message):
    with pytest.raises(UpcycleConfigError, match=None) as error:
        UpcycleConfig(routing=routing)
    assert message in str(error.value)


def test_config_keeps_its_own_copy_of_the_mapping():
    given = {"encoder": "expert_choice"}
    config = UpcycleConfig(routing=given)
    given["decoder"] = "expert_choice"
    assert config.routing == {"encoder": "expert_choice"}


def test_expert_choice_in_a_causal_stack_warns():
    """Expert choice looks at every token of the sequence: in T5's decoder (and a causal LM) that
    is not causal; in the encoder it is what the paper does (no warning)."""
    with pytest.warns(NonCausalRoutingWarning, match="decoder.block"):
        upcycle_fx.rewrite(t5(), pattern="all", num_experts=4, routing={"decoder": "expert_choice"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonCausalRoutingWarning)
        paper_t5()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    with pytest.warns(NonCausalRoutingWarning):
        upcycle_fx.rewrite(transformers.LlamaForCausalLM(config).eval(), num_experts=4, routing="expert_choice")


# --------------------------------------------------------------------------- kept on disk


def test_native_save_and_load_keep_each_layers_routing(tmp_path):
    model = paper_t5()
    upcycle_fx.save(model, tmp_path / "native")
    with warnings.catch_warnings():  # the loaded decoder is top-k: no warning about it
        warnings.simplefilter("error", NonCausalRoutingWarning)
        loaded = upcycle_fx.load(tmp_path / "native").eval()
    assert routings(loaded) == routings(model)
    assert torch.equal(logits(loaded, t5_inputs()), logits(model, t5_inputs()))


def test_save_pretrained_and_from_pretrained_keep_each_layers_routing(tmp_path):
    model = paper_t5()
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NonCausalRoutingWarning)
        loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert routings(loaded) == routings(model)
    assert torch.equal(logits(loaded, t5_inputs()), logits(model, t5_inputs()))


# --------------------------------------------------------------------------- report and command line


def test_report_rows_show_each_layers_routing():
    from upcycle_fx.passes.stack_routing import routing_rows
    from upcycle_fx.report import UpcycleReport

    result = upcycle_fx.upcycle(t5(), UpcycleConfig(pattern="all", num_experts=4, routing=PAPER))
    report = UpcycleReport(4, 4, 0, 0, 0.0, routing=routing_rows(result.config, result.converted))
    rows = dict(report.rows())
    assert rows["routing of encoder.block.0.layer.1.DenseReluDense"] == "expert_choice (capacity 2)"
    assert rows["routing of decoder.block.1.layer.2.DenseReluDense"] == "top_k (k=2)"


def test_cli_rewrite_takes_routing_per_stack(tmp_path):
    """`upcycle-fx rewrite T5DIR --routing encoder=expert_choice,decoder=top_k --out OUT`, run as
    users run it: the report shows each layer's routing and the written model keeps it."""
    t5().save_pretrained(tmp_path / "t5")
    result = run_cli("rewrite", tmp_path / "t5", "--pattern", "all", "--experts", "4",
                     "--routing", "encoder=expert_choice,decoder=top_k", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "expert_choice (capacity 2)" in result.stdout and "top_k (k=2)" in result.stdout
    assert "routing of encoder.block.1.layer.1.DenseReluDense" in result.stdout
    loaded = upcycle_fx.load(tmp_path / "out")
    assert routings(loaded) == [("encoder", "expert_choice")] * 2 + [("decoder", "top_k")] * 2


def test_cli_routing_from_a_recipe_mapping_and_a_bad_stack(tmp_path, capsys):
    from upcycle_fx.cli import main

    t5().save_pretrained(tmp_path / "t5")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("pattern: all\nnum_experts: 4\nrouting:\n  encoder: expert_choice\n  decoder: top_k\n")
    assert main(["inspect", str(tmp_path / "t5"), "--recipe", str(recipe)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "DenseReluDense" in line]
    assert [("expert_choice" in row, "top_k" in row) for row in rows] == [(True, False)] * 2 + [(False, True)] * 2
    assert main(["inspect", str(tmp_path / "t5"), "--routing", "vision=top_k"]) == 2
    assert "routing key 'vision' names no stack" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit:  # argparse's usage error
        main(["inspect", str(tmp_path / "t5"), "--routing", "encoder=sideways"])
    assert exit.value.code == 2 and "'sideways' is not one of top_k, expert_choice" in capsys.readouterr().err


# --------------------------------------------------------------------------- BART and Whisper


def test_bart_expert_choice_in_the_encoder_top_k_in_the_decoder(tmp_path):
    model = upcycle_fx.rewrite(bart(), pattern="all", num_experts=4, routing=PAPER)
    assert routings(model) == [("model", "expert_choice")] * 2 + [("model", "top_k")] * 2
    assert [n.split(".")[1] for n, _ in upcycle_fx.moe_layers(model)] == ["encoder"] * 2 + ["decoder"] * 2
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert routings(loaded) == routings(model)
    inputs = t5_inputs()
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_whisper_expert_choice_in_the_encoder_top_k_in_the_decoder(tmp_path):
    """Whisper captured on the user's inputs; the native checkpoint is loaded with the same
    inputs (moved by `load` to the meta device of the skeleton it rebuilds)."""
    inputs = whisper_inputs()
    model = upcycle_fx.rewrite(whisper(), pattern="all", num_experts=4, routing=PAPER, example_inputs=inputs)
    assert [(n.split(".")[1], r) for (n, _), (_, r) in zip(upcycle_fx.moe_layers(model), routings(model))] == (
        [("encoder", "expert_choice")] * 2 + [("decoder", "top_k")] * 2)
    upcycle_fx.save(model, tmp_path)
    loaded = upcycle_fx.load(tmp_path, example_inputs=inputs).eval()
    assert routings(loaded) == routings(model)
    assert torch.equal(logits(loaded, inputs), logits(model, inputs))


def test_a_mapping_with_top_k_everywhere_is_verified_against_the_dense_model():
    from upcycle_fx import UpcycleConfig
    from upcycle_fx.passes.verify import preserves_function

    assert preserves_function(UpcycleConfig(routing={"encoder": "top_k", "decoder": "top_k"}))
    assert not preserves_function(UpcycleConfig(routing={"encoder": "expert_choice", "decoder": "top_k"}))
    assert not preserves_function(UpcycleConfig(routing=lambda match: "top_k"))
