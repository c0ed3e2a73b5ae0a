"""The stock Hugging Face paths after `upcycle_fx.rewrite`: save_pretrained / from_pretrained
(bit for bit, or a loud refusal) and the Trainer (aux losses in the loss, router statistics in
its logs, resuming from its checkpoints)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import upcycle_fx

transformers = pytest.importorskip("transformers")

from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,  # noqa: E402
                          BertConfig, BertForSequenceClassification, BertModel, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments)

VOCAB = 96


def llama(dtype=torch.float32) -> LlamaForCausalLM:
    """Built in `dtype` as `from_pretrained(dtype=...)` builds it (rotary tables stay float32)."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM._from_config(config, dtype=dtype)


def gpt2(dtype=torch.float32) -> GPT2LMHeadModel:
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel._from_config(config, dtype=dtype)


def bert_config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=32)


def bert(dtype=torch.float32) -> BertModel:
    return BertModel._from_config(bert_config(), dtype=dtype)


def bert_classifier(dtype=torch.float32) -> BertForSequenceClassification:
    return BertForSequenceClassification._from_config(bert_config(), dtype=dtype)


def upcycled(build, dtype=torch.float32, **options):
    torch.manual_seed(0)
    options.setdefault("num_experts", 4)
    return upcycle_fx.rewrite(build(dtype), **options)


def tokens(batch=2, seq=8, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def main_output(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_model(loaded, original):
    """Same class, same MoE layers, every parameter and buffer equal bit for bit, same output."""
    assert type(loaded) is type(original)
    assert [n for n, _ in upcycle_fx.moe_layers(loaded)] == [n for n, _ in upcycle_fx.moe_layers(original)]
    for kind in ("named_parameters", "named_buffers"):
        want = dict(getattr(original, kind)())
        got = dict(getattr(loaded, kind)())
        assert got.keys() == want.keys(), kind
        for name, tensor in want.items():
            assert got[name].dtype == tensor.dtype, name
            assert torch.equal(got[name], tensor), name
    original.eval(), loaded.eval()
    ids = tokens()
    assert torch.equal(main_output(loaded, ids), main_output(original, ids))


# --------------------------------------------------------------------------- save / from_pretrained


@pytest.mark.parametrize("build, auto", [
    (llama, AutoModelForCausalLM),
    (gpt2, AutoModelForCausalLM),
    (bert, AutoModel),
    (bert_classifier, AutoModelForSequenceClassification),
], ids=["llama", "gpt2", "bert", "bert-classifier"])
def test_from_pretrained_gives_the_upcycled_model_back_bit_for_bit(build, auto, tmp_path):
    model = upcycled(build)
    model.save_pretrained(tmp_path)
    assert_same_model(auto.from_pretrained(tmp_path), model)
    assert_same_model(type(model).from_pretrained(tmp_path), model)


@pytest.mark.parametrize("dtype_argument", ["auto", torch.bfloat16, None])
def test_bfloat16_round_trip(dtype_argument, tmp_path):
    model = upcycled(llama, torch.bfloat16)
    model.save_pretrained(tmp_path)
    kwargs = {} if dtype_argument is None else {"dtype": dtype_argument}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **kwargs)
    assert_same_model(loaded, model)


def test_torch_dtype_keyword_still_works(tmp_path):
    model = upcycled(llama, torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype="auto"), model)


def test_a_loaded_model_saves_and_loads_again(tmp_path):
    model = upcycled(llama)
    model.save_pretrained(tmp_path / "first")
    once = AutoModelForCausalLM.from_pretrained(tmp_path / "first")
    once.save_pretrained(tmp_path / "second")
    assert_same_model(AutoModelForCausalLM.from_pretrained(tmp_path / "second"), model)


def test_a_loaded_model_is_an_ordinary_trainable_model(tmp_path):
    upcycled(llama).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not getattr(loaded, "is_quantized", False)
    assert getattr(loaded, "hf_quantizer", None) is None
    assert loaded.half().dtype == torch.float16  # quantized models refuse .half()


def test_bare_model_loads_from_a_checkpoint_with_a_head(tmp_path):
    model = upcycled(llama)
    model.save_pretrained(tmp_path)
    bare = AutoModel.from_pretrained(tmp_path)
    assert [n for n, _ in upcycle_fx.moe_layers(bare)] == ["layers.1.mlp"]
    for name, tensor in bare.state_dict().items():
        assert torch.equal(tensor, model.state_dict()["model." + name]), name


@pytest.mark.parametrize("build, auto", [(llama, AutoModelForCausalLM), (gpt2, AutoModelForCausalLM),
                                         (bert, AutoModel)], ids=["llama", "gpt2", "bert"])
def test_native_checkpoint_loads_with_from_pretrained_too(build, auto, tmp_path, caplog):
    model = upcycled(build)
    upcycle_fx.save(model, tmp_path)
    with caplog.at_level("WARNING"):
        loaded = auto.from_pretrained(tmp_path)
    assert "LOAD REPORT" not in caplog.text  # stored non-persistent buffers are not 'unexpected'
    assert_same_model(loaded, model)
    assert_same_model(upcycle_fx.load(tmp_path), model)


def test_native_checkpoint_of_a_plain_module_has_no_config_json(tmp_path):
    from upcycle_fx.testing.handwritten import SequentialMLPModel

    upcycle_fx.save(upcycle_fx.rewrite(SequentialMLPModel(), num_experts=4), tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_rewrite_leaves_the_input_config_alone():
    dense = llama()
    before = dense.config.to_dict()
    moe = upcycle_fx.rewrite(dense, num_experts=4)
    assert moe.config is not dense.config
    assert moe.model.config is moe.config
    assert dense.config.to_dict() == before
    assert getattr(dense.config, "quantization_config", None) is None
    assert moe.config.quantization_config.quant_method == "upcycle_fx"


@pytest.mark.parametrize("build", [llama, gpt2, bert], ids=["llama", "gpt2", "bert"])
def test_dense_models_load_and_save_as_before_with_upcycle_fx_imported(build, tmp_path):
    """What upcycle_fx registers with transformers (a quantization method, a name for refusing)
    changes nothing for other models: a dense model saves, loads and computes as before."""
    dense = build().eval()
    dense.save_pretrained(tmp_path / "dense")
    loaded = type(dense).from_pretrained(tmp_path / "dense").eval()
    assert_same_model(loaded, dense)
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(main_output(loaded, ids), main_output(dense, ids))


def _python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_without_upcycle_fx_from_pretrained_refuses(tmp_path):
    """Stock transformers alone must not build the dense model with random FFNs."""
    upcycled(llama).save_pretrained(tmp_path)
    result = _python(f"""
        import sys
        import transformers
        for loader in (transformers.AutoModelForCausalLM, transformers.LlamaForCausalLM):
            try:
                loader.from_pretrained({str(tmp_path)!r})
            except ValueError as error:
                assert "upcycle_fx" not in sys.modules
                print("REFUSED", error)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("REFUSED") == 2 and "import upcycle_fx" in result.stdout


@pytest.mark.slow
def test_import_upcycle_fx_before_transformers_registers_the_loader(tmp_path):
    upcycled(llama).save_pretrained(tmp_path)
    result = _python(f"""
        import sys
        import upcycle_fx
        assert "transformers" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
        print("LAYERS", [name for name, _ in upcycle_fx.moe_layers(model)])
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LAYERS ['model.layers.1.mlp']" in result.stdout


# --------------------------------------------------------------------------- aux losses in the loss


def test_training_loss_includes_the_aux_losses_only_in_training():
    model = upcycled(llama, aux_loss_weight=0.1)
    ids = tokens()
    model.train()
    with_aux = model(input_ids=ids, labels=ids).loss
    aux = upcycle_fx.aux_loss(model)
    assert aux.item() > 0.05
    upcycle_fx.set_aux_loss_in_output(model, False)
    assert not upcycle_fx.aux_loss_in_output(model)
    without = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(with_aux, without + aux, rtol=0, atol=1e-6)
    upcycle_fx.set_aux_loss_in_output(model, True)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, without, rtol=0, atol=1e-6)
    model.train()
    assert model(input_ids=ids).loss is None  # no labels: nothing to add to


def test_aux_loss_is_weighted_like_a_token_normalised_loss():
    """Under the Trainer's gradient accumulation the model's loss is a sum over label tokens
    divided by the accumulated batch's count (`num_items_in_batch`); the aux term gets this
    forward's share of those tokens (causal LM: each row's first label is no target)."""
    model = upcycled(llama, aux_loss_weight=0.1).train()
    ids = tokens(2, 8)
    accumulated = torch.tensor(3 * 2 * 7)  # as if this were one of three equal micro-batches
    loss = model(input_ids=ids, labels=ids, num_items_in_batch=accumulated).loss
    aux = upcycle_fx.aux_loss(model).detach()
    upcycle_fx.set_aux_loss_in_output(model, False)
    plain = model(input_ids=ids, labels=ids, num_items_in_batch=accumulated).loss
    torch.testing.assert_close(loss - plain, aux / 3, rtol=1e-5, atol=1e-7)


def test_aux_loss_choice_survives_deepcopy_and_from_pretrained(tmp_path):
    import copy

    model = upcycled(llama)
    assert upcycle_fx.aux_loss_in_output(copy.deepcopy(model))
    upcycle_fx.set_aux_loss_in_output(model, False)
    model.save_pretrained(tmp_path / "off")
    assert not upcycle_fx.aux_loss_in_output(AutoModelForCausalLM.from_pretrained(tmp_path / "off"))
    upcycle_fx.set_aux_loss_in_output(model, True)
    model.save_pretrained(tmp_path / "on")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "on").train()
    ids = tokens()
    loss = loaded(input_ids=ids, labels=ids).loss
    upcycle_fx.set_aux_loss_in_output(loaded, False)
    torch.testing.assert_close(loss, loaded(input_ids=ids, labels=ids).loss + upcycle_fx.aux_loss(loaded),
                               rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- Trainer


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=8):
        self.ids = tokens(n, seq, seed=3)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model, out, *, steps=3, callbacks=(), resume=None, save_steps=None, accumulation=1):
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4 // accumulation,
                             gradient_accumulation_steps=accumulation,
                             learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             data_seed=0, disable_tqdm=True, save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 500)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_loss_includes_aux_loss_and_routers_learn(accumulation, tmp_path):
    model = upcycled(llama, aux_loss_weight=0.1)
    router = model.model.layers[1].mlp.router.weight
    before = router.detach().clone()
    trainer = train(model, tmp_path / "with", callbacks=[upcycle_fx.MoECallback()], accumulation=accumulation)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert not torch.equal(router.detach(), before)

    plain = upcycled(llama, aux_loss_weight=0.1)
    upcycle_fx.set_aux_loss_in_output(plain, False)
    baseline = [e for e in train(plain, tmp_path / "without", accumulation=accumulation).state.log_history
                if "loss" in e]
    # Same weights, same first batch: the first logged losses differ by exactly the aux loss
    # (with accumulation: its mean over the micro-batches, which hold equally many tokens).
    first = logged[0]
    assert first["moe/aux_loss"] > 0.05
    assert first["loss"] - baseline[0]["loss"] == pytest.approx(first["moe/aux_loss"], abs=1e-4)


def test_callback_puts_router_statistics_in_the_log_history(tmp_path):
    model = upcycled(llama)
    trainer = train(model, tmp_path, steps=2, callbacks=[upcycle_fx.MoECallback()])
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    layer = "moe/model.layers.1.mlp"
    loads = [entry[f"{layer}/load/{e}"] for e in range(4)]
    assert sum(loads) == pytest.approx(1.0)
    assert entry[f"{layer}/drop_rate"] == 0.0  # dropless top-k
    assert entry[f"{layer}/load_imbalance"] >= 1.0
    assert entry["moe/aux_loss"] == pytest.approx(entry[f"{layer}/aux_loss"])


def test_router_gets_gradients_from_the_aux_loss():
    model = upcycled(llama, aux_loss_weight=1.0).train()
    ids = tokens()
    model(input_ids=ids, labels=ids).loss.backward()
    with_aux = model.model.layers[1].mlp.router.weight.grad.clone()
    model.zero_grad()
    upcycle_fx.set_aux_loss_in_output(model, False)
    model(input_ids=ids, labels=ids).loss.backward()
    assert not torch.allclose(with_aux, model.model.layers[1].mlp.router.weight.grad)


def test_trainer_resumes_the_upcycled_model_from_its_checkpoint(tmp_path):
    first = train(upcycled(llama), tmp_path, steps=2, save_steps=2)
    checkpoint = tmp_path / "checkpoint-2"
    saved = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert_same_model(saved, first.model)

    resumed = train(saved, tmp_path, steps=4, resume=str(checkpoint))
    assert resumed.state.global_step == 4
    assert [n for n, _ in upcycle_fx.moe_layers(resumed.model)] == ["model.layers.1.mlp"]
    assert upcycle_fx.aux_loss_in_output(resumed.model)
