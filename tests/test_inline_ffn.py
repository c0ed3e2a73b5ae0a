"""BART-style layers: an FFN written inline (`fc2(F.dropout(act(fc1(x)), p=self.activation_dropout,
training=self.training))`) in a layer whose forward cannot be traced on its own (caches,
`**kwargs`). The MoE stands where `fc1` was, the functional ops between the modules become
identities, the layer keeps its class and code; training, generate, save / load and ONNX behave
as the dense model's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import upcycle_fx
from upcycle_fx import MoE
from upcycle_fx.errors import RewriteError
from upcycle_fx.passes import FoldedIntoMoE
from upcycle_fx.passes.inline_ffn import FoldedFunction
from upcycle_fx.passes.splice import is_spliced

transformers = pytest.importorskip("transformers")

from transformers import (BartConfig, BartForConditionalGeneration, BioGptConfig, BioGptForCausalLM,  # noqa: E402
                          WhisperConfig, WhisperForConditionalGeneration, XGLMConfig, XGLMForCausalLM)

VOCAB, TOLERANCE = 96, 1e-5


def bart(**options) -> BartForConditionalGeneration:
    config = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                        decoder_ffn_dim=48, max_position_embeddings=32, **options)
    torch.manual_seed(0)
    return BartForConditionalGeneration(config).eval()


def biogpt(**options) -> BioGptForCausalLM:
    config = BioGptConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=32, **options)
    torch.manual_seed(0)
    return BioGptForCausalLM(config).eval()


def xglm(**options) -> XGLMForCausalLM:
    config = XGLMConfig(vocab_size=VOCAB, d_model=32, num_layers=2, attention_heads=4, ffn_dim=48,
                        max_position_embeddings=32, **options)
    torch.manual_seed(0)
    return XGLMForCausalLM(config).eval()


def whisper(**options) -> WhisperForConditionalGeneration:
    config = WhisperConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                           decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=16,
                           max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, suppress_tokens=None, begin_suppress_tokens=None,
                           **options)
    torch.manual_seed(0)
    return WhisperForConditionalGeneration(config).eval()


def tokens(batch=2, seq=8, seed=1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def inputs_of(name: str) -> dict:
    if name == "whisper":
        features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(2))
        return {"input_features": features, "decoder_input_ids": tokens(seq=5)}
    if name == "bart":
        return {"input_ids": tokens(), "decoder_input_ids": tokens(seq=5, seed=3)}
    return {"input_ids": tokens()}


BUILDERS = {"bart": bart, "whisper": whisper, "biogpt": biogpt, "xglm": xglm}
FFNS = {"bart": 4, "whisper": 4, "biogpt": 2, "xglm": 2}


def upcycled(model: nn.Module, **options) -> nn.Module:
    options = {"pattern": "all", "num_experts": 4, "top_k": 2, "seed": 0, **options}
    if isinstance(model, WhisperForConditionalGeneration):  # audio features: given, not built
        options.setdefault("example_inputs", inputs_of("whisper"))
    return upcycle_fx.rewrite(model, **options)


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def layers(model: nn.Module) -> list[nn.Module]:
    """The modules that own an `fc1` (the transformer layers)."""
    return [m for m in model.modules() if hasattr(m, "fc1") and hasattr(m, "fc2")]


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_layer_converts_in_place_and_preserves_the_function(name):
    """Encoder and decoder stacks: every FFN becomes an MoE at `fc1`, `fc2` and the activation
    module become identities, the layer is not re-traced, and the logits are unchanged."""
    dense = BUILDERS[name]()
    sparse = upcycled(dense)
    assert len(upcycle_fx.moe_layers(sparse)) == FFNS[name]
    for path, layer in sparse.named_modules():
        if not hasattr(layer, "fc1"):
            continue
        assert type(layer) is type(dense.get_submodule(path))  # the layer's own class and code
        assert isinstance(layer.fc1, MoE)
        assert isinstance(layer.fc2, FoldedIntoMoE) and isinstance(layer.activation_fn, FoldedIntoMoE)
    assert not any(is_spliced(m) for m in sparse.modules())
    with torch.no_grad():
        expected = dense(**inputs_of(name), use_cache=False).logits
        actual = sparse(**inputs_of(name), use_cache=False).logits
    assert relative(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_keep_their_own_code(dtype):
    """In half precision the layer's own dtype-dependent code (BART's float16 clamp) still runs:
    the layer is not re-traced. The upcycled logits match the dense ones at the dtype's precision."""
    dense = bart().to(dtype)
    sparse = upcycled(dense)
    assert all(type(layer).forward is type(dense_layer).forward
               for layer, dense_layer in zip(layers(sparse), layers(dense)))
    batch = inputs_of("bart")
    with torch.no_grad():
        expected, actual = dense(**batch).logits, sparse(**batch).logits
    assert actual.dtype == dtype
    assert relative(actual.float(), expected.float()) <= (1e-2 if dtype == torch.bfloat16 else 2e-3)


def test_activation_dropout_runs_inside_the_experts_in_training():
    """p=1 between activation and fc2: in training the dense FFN outputs exactly fc2's bias.
    The upcycled model must too (the experts drop their hidden units); the dropout left on the
    MoE's output would give 0 instead, and a dropout lost would give the FFN's output."""
    dense = bart(activation_dropout=1.0, dropout=0.0, attention_dropout=0.0)
    sparse = upcycled(dense)
    for layer in layers(sparse):
        assert layer.activation_dropout == 0.0
        assert layer.fc1.experts.hidden_dropout == 1.0
    batch = inputs_of("bart")
    dense.train(), sparse.train()
    expected = dense(**batch, use_cache=False).logits
    actual = sparse(**batch, use_cache=False).logits
    assert relative(actual, expected) <= TOLERANCE
    dense.eval(), sparse.eval()  # back in eval mode nothing is dropped
    with torch.no_grad():
        assert relative(sparse(**batch).logits, dense(**batch).logits) <= TOLERANCE


def test_the_layers_other_dropout_stays_where_it_was():
    """`self.dropout` (after fc2, and on embeddings and attention outputs) has the same value as
    `self.activation_dropout`: only the latter is set to 0. With both at p=1 the dense model in
    training is deterministic; zeroing the wrong attribute would change the output."""
    dense = bart(activation_dropout=1.0, dropout=1.0, attention_dropout=0.0)
    sparse = upcycled(dense)
    for layer in layers(sparse):
        assert (layer.dropout, layer.activation_dropout) == (1.0, 0.0)
    batch = inputs_of("bart")
    dense.train(), sparse.train()
    assert relative(sparse(**batch, use_cache=False).logits, dense(**batch, use_cache=False).logits) <= TOLERANCE


def test_dropout_follows_train_and_eval():
    """With p=0.5 both dropouts are active in training (two seeds differ) and off in eval."""
    dense = biogpt(activation_dropout=0.5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    sparse = upcycled(dense).train()
    ids = tokens()
    torch.manual_seed(1)
    first = sparse(input_ids=ids).logits
    torch.manual_seed(2)
    second = sparse(input_ids=ids).logits
    assert relative(first, second) > 1e-3
    sparse.eval()
    with torch.no_grad():
        assert relative(sparse(input_ids=ids).logits, dense(input_ids=ids).logits) <= TOLERANCE


# --------------------------------------------------------------------------- generate


@pytest.mark.parametrize("name", ["biogpt", "bart", "whisper"])
def test_generate_matches_the_dense_model(name):
    dense = BUILDERS[name]()
    sparse = upcycled(dense)
    batch = {k: v for k, v in inputs_of(name).items() if k != "decoder_input_ids"}
    options = {"max_new_tokens": 6, "do_sample": False, "num_beams": 1}
    with torch.no_grad():
        expected = dense.generate(**batch, **options)
        actual = sparse.generate(**batch, **options)
    assert torch.equal(actual, expected)


# --------------------------------------------------------------------------- save / load


def test_save_pretrained_and_from_pretrained_round_trip(tmp_path):
    """The stock transformers path: the loaded model is the upcycled one (MoE at fc1, the
    activation dropout inside the experts), with the same logits."""
    dense = bart(activation_dropout=0.25)
    sparse = upcycled(dense)
    sparse.save_pretrained(tmp_path)
    loaded = BartForConditionalGeneration.from_pretrained(tmp_path).eval()
    for layer in layers(loaded):
        assert isinstance(layer.fc1, MoE) and isinstance(layer.fc2, FoldedIntoMoE)
        assert layer.activation_dropout == 0.0 and layer.fc1.experts.hidden_dropout == 0.25
    batch = inputs_of("bart")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, sparse(**batch).logits)


def test_upcycle_fx_save_and_load_round_trip(tmp_path):
    sparse = upcycled(whisper(activation_dropout=0.25))
    upcycle_fx.save(sparse, tmp_path / "ckpt")
    skeleton_inputs = {k: v.to("meta") for k, v in inputs_of("whisper").items()}  # the skeleton is on meta
    loaded = upcycle_fx.load(tmp_path / "ckpt", example_inputs=skeleton_inputs).eval()
    assert [p for p, _ in upcycle_fx.moe_layers(loaded)] == [p for p, _ in upcycle_fx.moe_layers(sparse)]
    assert all(layer.activation_dropout == 0.0 for layer in layers(loaded))
    batch = inputs_of("whisper")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, sparse(**batch).logits)


# --------------------------------------------------------------------------- plain torch layers


class Layer(nn.Module):
    """A layer that FX cannot trace on its own (`bool()` of a tensor input), with an inline FFN.
    `literal_p`, `shared_p`, `constant_flag`, `functional_act` and `global_act` make variants."""

    def __init__(self, d=16, f=32, *, p=0.25, literal_p=False, shared_p=False, constant_flag=False,
                 functional_act=None, global_act=False, norm=None):
        super().__init__()
        self.norm = norm or nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.activation_fn = functional_act or nn.GELU()
        self.activation_dropout = p
        self.literal_p, self.shared_p, self.constant_flag = literal_p, shared_p, constant_flag
        self.global_act = global_act

    def forward(self, x, scale=None):
        if scale is not None and bool(scale.sum() > 0):  # data-dependent: no symbolic trace
            x = x * scale
        if self.shared_p:
            x = F.dropout(x, p=self.activation_dropout, training=self.training)
        h = self.fc1(self.norm(x))
        h = torch.relu(h) if self.global_act else self.activation_fn(h)
        p = 0.25 if self.literal_p else self.activation_dropout
        h = F.dropout(h, p=p, training=True if self.constant_flag else self.training)
        return x + self.fc2(h)


class Stack(nn.Module):
    def __init__(self, **options):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Layer(**options) for _ in range(2))

    def forward(self, x, scale):
        for layer in self.layers:
            x = layer(x, scale)
        return x


class RowNorm(nn.Module):
    """Normalises row by row in a Python loop over a tensor: FX traces it only as a leaf."""

    def forward(self, x):
        return torch.stack([row / row.norm(dim=-1, keepdim=True) for row in x])


def stack_inputs():
    generator = torch.Generator().manual_seed(5)
    return (torch.randn(2, 6, 16, generator=generator), torch.ones(16))


def test_plain_layer_converts_with_its_dropout_attribute():
    dense = Stack(p=1.0).eval()
    sparse = upcycled(dense, example_inputs=stack_inputs())
    assert all(isinstance(layer.fc1, MoE) and layer.activation_dropout == 0.0 for layer in sparse.layers)
    assert all(layer.activation_dropout == 1.0 and not layer.training for layer in dense.layers)  # input untouched
    for mode in (False, True):  # p=1: in training the FFN is fc2's bias in both models
        dense.train(mode), sparse.train(mode)
        with torch.no_grad():
            assert relative(sparse(*stack_inputs()), dense(*stack_inputs())) <= TOLERANCE


def test_the_users_leaf_modules_hold_when_the_region_is_traced_again():
    """The attribute probe re-traces the region with the leaves the capture used, `leaf_modules=`
    included (without them the re-trace fails and the layer cannot be converted)."""
    dense = Stack(norm=RowNorm()).eval()
    sparse = upcycled(dense, example_inputs=stack_inputs(), leaf_modules=[RowNorm])
    assert all(isinstance(layer.fc1, MoE) and layer.activation_dropout == 0.0 for layer in sparse.layers)
    with torch.no_grad():
        assert relative(sparse(*stack_inputs()), dense(*stack_inputs())) <= TOLERANCE


def test_activation_function_held_by_an_attribute_becomes_an_identity():
    """`self.activation_fn = F.relu` (Mask2Former's pixel decoder): no module to fold, the
    attribute itself becomes a `FoldedFunction`."""
    dense = Stack(functional_act=F.relu).eval()
    sparse = upcycled(dense, example_inputs=stack_inputs())
    assert all(isinstance(layer.activation_fn, FoldedFunction) for layer in sparse.layers)
    assert all(layer.activation_fn is F.relu for layer in dense.layers)  # input untouched
    with torch.no_grad():
        assert relative(sparse(*stack_inputs()), dense(*stack_inputs())) <= TOLERANCE


@pytest.mark.parametrize("variant, reason", [
    ({"literal_p": True}, "not a float attribute of layers.1"),
    ({"shared_p": True}, "layers.1.activation_dropout, which"),
    ({"constant_flag": True}, "training flag is True"),
    ({"global_act": True, "p": 0.0}, "not called through an attribute"),
])
def test_what_cannot_be_made_an_identity_is_a_named_error(variant, reason):
    """The layer cannot be re-traced either: RewriteError naming the layer, why it cannot be
    traced, and why the swap cannot stand in for it; the input model is left as it was."""
    dense = Stack(**variant).eval()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    with pytest.raises(RewriteError, match="layers.1: the FFN inside is written inline") as error:
        upcycled(dense, example_inputs=stack_inputs(), pattern=[1])
    assert reason in str(error.value)
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())
    assert all(layer.activation_dropout == variant.get("p", 0.25) for layer in dense.layers)



# --------------------------------------------------------------------------- ONNX


@pytest.mark.slow
@pytest.mark.parametrize("name", ["biogpt", "bart"])
def test_onnx_export_runs_in_onnxruntime_like_the_dense_model(name, tmp_path):
    """`upcycle_fx.export_onnx` of the upcycled model (the dense one exports with
    `torch.onnx.export` too): onnxruntime's logits against the dense model's in PyTorch."""
    pytest.importorskip("onnxruntime")
    from onnx_helpers import ONNX_TOLERANCE, ort_run, ort_session, relative_error

    dense = BUILDERS[name]()
    sparse = upcycled(dense)
    batch = inputs_of(name)
    path = upcycle_fx.export_onnx(sparse, tmp_path / "model.onnx", kwargs=batch)
    assert all(layer.lowering != "absent" for layer in path.report.layers)
    with torch.no_grad():
        expected = dense(**batch, use_cache=False).logits
    assert relative_error(ort_run(ort_session(path), batch), expected) <= ONNX_TOLERANCE
