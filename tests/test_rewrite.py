"""rewrite/upcycle: exact function at conversion, untouched input, right parameters and selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import upcycle_fx
from upcycle_fx import FoldedIntoMoE, MoE
from upcycle_fx.report import count_parameters, first_tensor
from upcycle_fx.testing.zoo import ZOO

from helpers import FUNCTION_TOLERANCE, ZOO_NAMES, build, max_error


@pytest.mark.parametrize("pattern", ["every_other_mlp", "all"])
@pytest.mark.parametrize("name", ZOO_NAMES)
def test_function_is_preserved(name, pattern):
    """normalize_weights=True, no noise, top-k: outputs equal the dense model's (float32, eval)
    to <= 1e-5 relative, at two batch/sequence sizes, with a non-uniform random router."""
    dense = build(name)
    sparse = upcycle_fx.rewrite(dense, pattern, router_init_std=1.0, seed=0)
    assert type(sparse) is type(dense)
    assert len(upcycle_fx.moe_layers(sparse)) == (
        len(ZOO[name].expected) if pattern == "all" else len(ZOO[name].expected) // 2)
    assert max_error(dense, sparse.eval(), name) <= FUNCTION_TOLERANCE


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_input_model_is_not_mutated(name):
    """Parameters, module tree and outputs of the input are the same after rewrite."""
    dense = build(name)
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    modules = [(n, type(m)) for n, m in dense.named_modules()]
    upcycle_fx.rewrite(dense)
    assert [(n, type(m)) for n, m in dense.named_modules()] == modules
    assert dense.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in dense.state_dict().items())
    assert not any(isinstance(m, MoE) for m in dense.modules())


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_parameter_count(name):
    """after = before + sum over MoE layers of ((E - 1) * FFN params + router params)."""
    dense = build(name)
    result = upcycle_fx.upcycle(dense, upcycle_fx.UpcycleConfig(num_experts=4))
    ffn_params = sum(m.num_parameters for m in result.converted)
    router_params = sum(4 * m.d_model for m in result.converted)
    assert count_parameters(result.model) == count_parameters(dense) + 3 * ffn_params + router_params


@pytest.mark.parametrize("name", ["llama", "gpt2", "hw-sigmoid-gated", "phi3", "t5-gated"])
def test_experts_are_exact_copies_and_router_is_initialised(name):
    """Every expert equals the dense FFN it came from; router weights ~ N(0, std) in float32."""
    dense = build(name)
    result = upcycle_fx.upcycle(dense, upcycle_fx.UpcycleConfig(num_experts=8, router_init_std=0.02, seed=1))
    for (path, moe), match in zip(upcycle_fx.moe_layers(result.model), result.converted):
        experts = moe.experts
        for stacked in (experts.up_proj, experts.down_proj, experts.up_bias, experts.down_bias):
            if stacked is not None:
                assert all(torch.equal(stacked[e], stacked[0]) for e in range(8))
        down = match.site.down.tensors(dense)[0]
        assert torch.equal(experts.down_proj[0], down)
        weight = moe.router.weight.detach()
        assert weight.shape == (8, match.d_model) and moe.router.bias is None
        assert 0.015 < float(weight.std()) < 0.025 and abs(float(weight.mean())) < 0.005


def test_expert_noise_makes_experts_differ():
    """expert_noise_std > 0 perturbs each expert independently."""
    moe = upcycle_fx.moe_layers(upcycle_fx.rewrite(build("llama"), expert_noise_std=0.01, seed=0))[0][1]
    up = moe.experts.up_proj
    assert not torch.equal(up[0], up[1])
    assert 0.005 < float((up[0] - up[1]).detach().std()) < 0.02


def test_every_other_mlp_takes_blocks_1_and_3():
    """Paper default: the second of each pair of blocks, per stack."""
    result = upcycle_fx.upcycle(build("t5"))
    assert [(m.stack, m.block) for m in result.converted] == [
        ("encoder.block", 1), ("encoder.block", 3), ("decoder.block", 1), ("decoder.block", 3)]
    names = [n for n, _ in upcycle_fx.moe_layers(result.model)]
    assert names == [f"{s}.block.{i}.layer.{j}.DenseReluDense"
                     for s, j in (("encoder", 1), ("decoder", 2)) for i in (1, 3)]


def test_pattern_as_indices_and_callable():
    """A list of indices (execution order) and a callable on MLPMatch select exactly those."""
    by_index = upcycle_fx.upcycle(build("gpt2"), upcycle_fx.UpcycleConfig(pattern=[0, 2]))
    assert [m.index for m in by_index.converted] == [0, 2]
    by_fn = upcycle_fx.upcycle(build("gpt2"), upcycle_fx.UpcycleConfig(pattern=lambda m: m.block == 3))
    assert [m.block for m in by_fn.converted] == [3]


def test_split_ffn_leaves_identity_where_the_second_linear_was():
    """BERT: the MoE sits in `intermediate`, `output.dense` becomes FoldedIntoMoE; the
    residual, dropout and LayerNorm of BertOutput are kept."""
    sparse = upcycle_fx.rewrite(build("bert"))
    layer = sparse.encoder.layer[1]
    assert isinstance(layer.intermediate, MoE)
    assert isinstance(layer.output.dense, FoldedIntoMoE)
    assert isinstance(layer.output.LayerNorm, torch.nn.LayerNorm)
    assert not isinstance(sparse.encoder.layer[0].intermediate, MoE)


def test_inplace_converts_the_given_model():
    """inplace=True returns the same object, now holding MoE layers."""
    dense = build("llama")
    sparse = upcycle_fx.rewrite(dense, inplace=True)
    assert sparse is dense and len(upcycle_fx.moe_layers(dense)) == 2


@pytest.mark.parametrize("name", ["bert", "opt", "gpt2"])
def test_dropout_follows_train_and_eval(name):
    """Dropout outside the FFN (modules and OPT's functional dropout) keeps working: in train
    mode with the same seed the upcycled model equals the dense one; eval is deterministic."""
    dense, inputs = build(name), ZOO[name].inputs(2, 8)
    sparse = upcycle_fx.rewrite(dense, router_init_std=1.0)
    dense.train(), sparse.train()
    torch.manual_seed(3)
    reference = first_tensor(dense(**inputs))
    torch.manual_seed(3)
    upcycled = first_tensor(sparse(**inputs))
    torch.manual_seed(4)
    other_seed = first_tensor(sparse(**inputs))
    assert (upcycled - reference).abs().max() <= 1e-5 * reference.abs().max()
    assert (upcycled - other_seed).abs().max() > 1e-3  # dropout is really active
    sparse.eval()
    assert torch.equal(first_tensor(sparse(**inputs)), first_tensor(sparse(**inputs)))


def test_hidden_dropout_inside_the_ffn_is_kept():
    """T5 applies dropout between act and wo; the experts carry it and follow train/eval."""
    dense = build("t5")
    moe = upcycle_fx.moe_layers(upcycle_fx.rewrite(dense))[0][1]
    assert moe.experts.hidden_dropout == pytest.approx(dense.config.dropout_rate)
    x = torch.randn(4, dense.config.d_model)
    moe.train()
    assert not torch.equal(moe(x), moe(x))
    moe.eval()
    assert torch.equal(moe(x), moe(x))


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5", "phi3"])
def test_generate_matches_the_dense_model(name):
    """Hugging Face generate() works on the upcycled model and gives the dense tokens."""
    dense = build(name)
    sparse = upcycle_fx.rewrite(dense, router_init_std=1.0)
    inputs = ZOO[name].inputs(1, 6)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(sparse.generate(**inputs, **kwargs), dense.generate(**inputs, **kwargs))


def test_real_checkpoint_embeddings_are_unchanged():
    """all-MiniLM-L6-v2 upcycled: mean-pooled sentence embeddings of real sentences have cosine
    similarity >= 0.99999 with the dense ones and <= 1e-5 relative error."""
    from upcycle_fx.testing.zoo import load_minilm

    model, tokenizer = load_minilm()
    sparse = upcycle_fx.rewrite(model, router_init_std=1.0, seed=0)
    batch = tokenizer(["Sparse upcycling reuses a dense checkpoint.", "A cat sat on the mat.",
                       "Experts are copies of the feed-forward block."], padding=True, return_tensors="pt")

    def embed(m):
        with torch.no_grad():
            hidden = m(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    dense_emb, sparse_emb = embed(model), embed(sparse)
    assert float(F.cosine_similarity(dense_emb, sparse_emb).min()) >= 0.99999
    assert float((dense_emb - sparse_emb).abs().max() / dense_emb.abs().max()) <= FUNCTION_TOLERANCE
    assert len(upcycle_fx.moe_layers(sparse)) == 3


def test_random_expert_init_replaces_the_copies():
    """expert_init='random': experts differ from the FFN and from each other, with the dense
    matrices' scale; biases start at zero; the function is no longer the dense one."""
    dense = build("gpt2")
    sparse = upcycle_fx.rewrite(dense, expert_init="random", seed=0)
    moe = upcycle_fx.moe_layers(sparse)[0][1]
    dense_up = dense.transformer.h[1].mlp.c_fc.weight
    up = moe.experts.up_proj.detach()
    assert not torch.equal(up[0], up[1]) and not torch.allclose(up[0], dense_up.t())
    assert abs(float(up.std()) / float(dense_up.detach().std()) - 1) < 0.05
    assert float(moe.experts.up_bias.abs().max()) == 0.0
    assert max_error(dense, sparse.eval(), "gpt2") > 1e-2


def test_unknown_expert_init_is_a_config_error():
    with pytest.raises(upcycle_fx.UpcycleConfigError, match="expert_init='zeros'"):
        upcycle_fx.rewrite(build("gpt2"), expert_init="zeros")


@pytest.mark.parametrize("name", ["t5", "timm-vit", "bert"])
def test_new_layers_keep_the_mode_of_what_they_replace(name):
    """Rewriting an eval-mode model gives eval-mode MoE layers: deterministic outputs equal to the
    dense model without calling .eval() again (T5 has dropout inside its FFN)."""
    dense = build(name)
    sparse = upcycle_fx.rewrite(dense, router_init_std=1.0)
    assert not any(m.training for m in sparse.modules())
    assert max_error(dense, sparse, name) <= FUNCTION_TOLERANCE
    dense.train()
    assert all(m.training for _, m in upcycle_fx.moe_layers(upcycle_fx.rewrite(dense)))


class _CountingNormBlock(torch.nn.Module):
    """BatchNorm (train mode updates running statistics), a call counter buffer, an FFN and a
    data-dependent branch (capture needs the example values)."""

    def __init__(self, d=8):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(d)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        self.calls += 1
        h = self.norm(x.transpose(1, 2)).transpose(1, 2)
        if h.abs().max() > 1e6:
            h = h.clamp(-1e6, 1e6)
        return x + self.mlp(h)


class _Unsplittable(torch.nn.Module):
    """Fails whole-model capture (a Python loop over a tensor's rows): captured by region."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_CountingNormBlock(), _CountingNormBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return torch.stack([row for row in x])


def _state_of(model):
    """Everything a run could change: tensors, modes, grad flags, hooks."""
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=True).items()},
            [(n, m.training, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def _assert_same_state(model, state):
    tensors, modules, grads = _state_of(model)
    assert tensors.keys() == state[0].keys()
    changed = [k for k in tensors if not torch.equal(tensors[k], state[0][k])]
    assert not changed, f"changed by the rewrite: {changed}"
    assert modules == state[1] and grads == state[2]


@pytest.mark.parametrize("cls", [lambda: torch.nn.Sequential(_CountingNormBlock(), _CountingNormBlock()),
                                 _Unsplittable], ids=["whole", "regions"])
def test_running_the_input_leaves_it_as_found(cls):
    """Capture (shadow values or the example forward) and verification run the input model:
    BatchNorm statistics, call counters, mixed train/eval modes, frozen parameters and hooks
    are all as before; the rewrite is still verified."""
    dense = cls().train()
    dense.get_submodule(next(n for n, m in dense.named_modules() if isinstance(m, torch.nn.GELU))).eval()
    next(dense.parameters()).requires_grad_(False)
    dense.register_forward_hook(lambda module, args, output: None)
    state = _state_of(dense)
    result = upcycle_fx.upcycle(dense, upcycle_fx.UpcycleConfig(pattern="all", router_init_std=1.0),
                                example_inputs=torch.randn(2, 5, 8))
    _assert_same_state(dense, state)
    assert result.verified_error is not None and result.verified_error <= FUNCTION_TOLERANCE
    assert len(upcycle_fx.moe_layers(result.model)) == 2


def test_hugging_face_model_and_config_are_left_as_found():
    """An HF model in train mode: state, modes and its config (every field, including
    `_attn_implementation`) are unchanged by find_mlps and rewrite."""
    dense = build("llama").train()
    config_before = dense.config.to_dict()
    attn = dense.config._attn_implementation
    state = _state_of(dense)
    upcycle_fx.find_mlps(dense)
    upcycle_fx.rewrite(dense)
    _assert_same_state(dense, state)
    assert dense.config.to_dict() == config_before and dense.config._attn_implementation == attn
