"""FFN forms beyond Linear -> activation -> Linear: 1x1 convolutions (SqueezeBERT, SwiftFormer)
and weight-shared FFNs (ALBERT: one layer's weights run by every block; XLNet: one FFN on two
streams), which become one MoE shared by every call. Each conversion is checked against the
dense model at 1e-5 (float32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import upcycle_fx
from upcycle_fx.moe.channels import ChannelsMoE

TOL = 1e-5


def _upcycle(model, **kwargs):
    config = upcycle_fx.UpcycleConfig(pattern="all", num_experts=4, top_k=2, seed=0)
    return upcycle_fx.upcycle(model, config, **kwargs)


def _max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _calls(module: nn.Module, run) -> int:
    count = [0]
    handle = module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    try:
        run()
    finally:
        handle.remove()
    return count[0]


# --------------------------------------------------------------------------- 1x1 convolutions


def _squeezebert(groups: int = 4):
    config = transformers.SqueezeBertConfig(
        vocab_size=100, hidden_size=32, embedding_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64, intermediate_groups=groups, output_groups=groups)
    torch.manual_seed(0)
    return transformers.SqueezeBertForMaskedLM(config).eval()


@pytest.mark.parametrize("groups", [1, 4])
def test_squeezebert_conv1d_ffns_convert_exactly(groups):
    """SqueezeBERT's FFN is two 1x1 nn.Conv1d on [B, C, T] (grouped by default): found as
    pointwise_conv FFNs, converted into MoEs that run on the channels, same logits."""
    model = _squeezebert(groups)
    found = upcycle_fx.find_mlps(model)
    assert [(m.kind, m.d_model, m.d_ff) for m in found] == [("pointwise_conv", 32, 64)] * 2
    result = _upcycle(model)
    sparse = result.model
    host = sparse.transformer.encoder.layers[0].intermediate
    assert isinstance(host, ChannelsMoE) and host.channel_dim == -2
    assert [name for name, _ in upcycle_fx.moe_layers(sparse)] == [
        f"transformer.encoder.layers.{i}.intermediate.moe" for i in range(2)]
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_error(sparse(ids).logits, model(ids).logits) < TOL
    assert result.verified_error is not None and result.verified_error < TOL


def test_a_grouped_conv_becomes_a_block_diagonal_expert_weight():
    """A conv with groups=4 is the linear map with 4 diagonal blocks: each expert starts as it."""
    model = _squeezebert(groups=4)
    conv = model.transformer.encoder.layers[0].intermediate.conv1d
    sparse = _upcycle(model).model
    experts = sparse.transformer.encoder.layers[0].intermediate.moe.experts
    expected = torch.block_diag(*conv.weight.squeeze(-1).chunk(4))
    for e in range(experts.num_experts):
        torch.testing.assert_close(experts.up_proj[e], expected, rtol=0, atol=0)
    assert int((expected != 0).sum()) == conv.weight.numel()


class _ConvFFNBlock(nn.Module):
    """A channels-first block with a 1x1 Conv2d FFN (SwiftFormer, ConvNeXt style)."""

    def __init__(self, conv=nn.Conv2d, channels: int = 16):
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.fc1, self.act, self.fc2 = conv(channels, 4 * channels, 1), nn.GELU(), conv(4 * channels, channels, 1)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def test_a_conv2d_ffn_on_images_converts_exactly():
    model = nn.Sequential(_ConvFFNBlock(), _ConvFFNBlock()).eval()
    x = torch.randn(2, 16, 5, 3)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert [(m.kind, m.paths) for m in found] == [("pointwise_conv", (f"{i}.fc1", f"{i}.fc2")) for i in range(2)]
    sparse = _upcycle(model, example_inputs=(x,)).model
    assert all(isinstance(b.fc1, ChannelsMoE) and b.fc1.channel_dim == -3 for b in sparse)
    with torch.no_grad():
        assert _max_error(sparse(x), model(x)) < TOL


class _QuantisedConv(nn.Conv2d):
    """A convolution whose forward is not the plain one (fake quantisation)."""

    def forward(self, x):
        return super().forward(x).round()


def test_a_conv_with_its_own_forward_is_a_near_miss_naming_it():
    """Kept whole (a leaf), a conv subclass with its own forward is named, not copied."""
    model = nn.Sequential(_ConvFFNBlock(conv=_QuantisedConv)).eval()
    found = upcycle_fx.find_mlps(model, example_inputs=(torch.randn(1, 16, 2, 2),), leaf_modules=(_QuantisedConv,))
    assert list(found) == []
    assert any("_QuantisedConv overrides Conv2d's forward" in m.reason and "0.fc1" in m.reason
               for m in found.near_misses)


def test_a_conv_that_mixes_positions_is_no_ffn():
    """A 3x1 kernel mixes neighbouring positions: not a projection, nothing is found."""
    block = _ConvFFNBlock()
    block.fc1 = nn.Conv2d(16, 64, (3, 1), padding=(1, 0))
    found = upcycle_fx.find_mlps(nn.Sequential(block).eval(), example_inputs=(torch.randn(1, 16, 4, 4),))
    assert list(found) == []


# --------------------------------------------------------------------------- weight-shared FFNs


def test_albert_shared_ffn_becomes_one_moe_run_by_every_layer():
    """ALBERT runs one layer's weights in every block: its FFN is found once (with one call per
    block) and becomes one MoE shared by every block."""
    config = transformers.AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AlbertForMaskedLM(config).eval()
    found = upcycle_fx.find_mlps(model)
    assert len(found) == 1 and len(found[0].site.every_call) == 3
    result = _upcycle(model)
    (name, moe), = upcycle_fx.moe_layers(result.model)
    assert name.startswith("albert.encoder.albert_layer_groups.0.albert_layers.0.")
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _calls(moe, lambda: result.model(ids)) == 3
        assert _max_error(result.model(ids).logits, model(ids).logits) < TOL


def test_xlnet_ffn_run_on_both_streams_becomes_one_moe_per_layer():
    """XLNet runs each layer's FFN on the content and the query stream (with target_mapping):
    one MoE per layer, run twice."""
    config = transformers.XLNetConfig(vocab_size=100, d_model=32, d_inner=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.XLNetLMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    perm_mask = torch.zeros(2, 6, 6)
    perm_mask[:, :, -1] = 1.0
    target_mapping = torch.zeros(2, 1, 6)
    target_mapping[:, 0, -1] = 1.0
    inputs = {"input_ids": ids, "perm_mask": perm_mask, "target_mapping": target_mapping}
    found = upcycle_fx.find_mlps(model, example_inputs=inputs)
    assert [len(m.site.every_call) for m in found] == [2, 2]
    sparse = _upcycle(model, example_inputs=inputs).model
    moes = upcycle_fx.moe_layers(sparse)
    assert len(moes) == 2
    with torch.no_grad():
        assert _calls(moes[0][1], lambda: sparse(**inputs)) == 2
        assert _max_error(sparse(**inputs).logits, model(**inputs).logits) < TOL
        assert _max_error(sparse(input_ids=ids).logits, model(input_ids=ids).logits) < TOL


class _MLP(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class _TwoBlocksOneFFN(nn.Module):
    """One FFN module registered in two blocks (tied): one shared MoE, still tied."""

    def __init__(self):
        super().__init__()
        shared = _MLP()
        self.blocks = nn.ModuleList([nn.ModuleDict({"mlp": shared}), nn.ModuleDict({"mlp": shared})])

    def forward(self, x):
        for block in self.blocks:
            x = x + block["mlp"](x)
        return x


def test_an_ffn_module_registered_in_two_blocks_becomes_one_shared_moe():
    model = _TwoBlocksOneFFN().eval()
    x = torch.randn(2, 5, 8)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert [m.paths for m in found] == [("blocks.0.mlp.up", "blocks.0.mlp.down")]
    sparse = _upcycle(model, example_inputs=(x,)).model
    assert isinstance(sparse.blocks[0]["mlp"], upcycle_fx.MoE)
    assert sparse.blocks[0]["mlp"] is sparse.blocks[1]["mlp"]
    assert len(upcycle_fx.moe_layers(sparse)) == 1
    with torch.no_grad():
        assert _max_error(sparse(x), model(x)) < TOL


class _UpAlsoUsedAlone(nn.Module):
    """The FFN's up projection is also called on its own: not a shared FFN, a shared weight."""

    def __init__(self):
        super().__init__()
        self.mlp = _MLP()

    def forward(self, x):
        return x + self.mlp(x) + self.mlp.up(x)[..., :8]


def test_a_projection_shared_with_something_else_is_a_near_miss():
    found = upcycle_fx.find_mlps(_UpAlsoUsedAlone().eval(), example_inputs=(torch.randn(1, 3, 8),))
    assert list(found) == []
    assert any("mlp.up is called 2 times (shared weights), the rest of the FFN 1 times" in m.reason
               for m in found.near_misses)


class _SharedButDifferentActivation(nn.Module):
    """up and down shared by two FFNs with different activations: one MoE cannot be both."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        x = x + self.down(torch.relu(self.up(x)))
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def test_shared_projections_in_different_ffns_are_a_near_miss():
    found = upcycle_fx.find_mlps(_SharedButDifferentActivation().eval(), example_inputs=(torch.randn(1, 3, 8),))
    assert list(found) == []
    assert any("is called 2 times (shared weights)" in m.reason and "same dense FFN" in m.reason
               for m in found.near_misses)


# --------------------------------------------------------------------------- named refusals


class _MixFFN(nn.Module):
    """SegFormer's Mix-FFN: a depthwise convolution over neighbouring tokens inside the FFN."""

    def __init__(self, d: int = 16, f: int = 32):
        super().__init__()
        self.fc1, self.dwconv, self.fc2 = nn.Linear(d, f), nn.Conv1d(f, f, 3, padding=1, groups=f), nn.Linear(f, d)

    def forward(self, x):  # x: [B, T, d]
        h = self.dwconv(self.fc1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(F.gelu(h))


def test_a_mix_ffn_is_a_near_miss_naming_its_token_mixing_conv():
    model = nn.Sequential(_MixFFN()).eval()
    found = upcycle_fx.find_mlps(model, example_inputs=(torch.randn(2, 5, 16),))
    assert list(found) == []
    assert [m.pattern for m in found.near_misses] == ["mixing_conv"]
    assert "Conv1d at 0.dwconv between the FFN's projections mixes neighbouring tokens" in found.near_misses[0].reason
    with pytest.raises(upcycle_fx.NoMLPFoundError, match="mixes neighbouring tokens"):
        upcycle_fx.rewrite(model, example_inputs=(torch.randn(2, 5, 16),))


class _HiddenNormFFN(nn.Module):
    """Kosmos-2.5's text FFN: a LayerNorm on the hidden vector before the down projection."""

    def __init__(self, d: int = 16, f: int = 32):
        super().__init__()
        self.fc1, self.act, self.norm, self.fc2 = nn.Linear(d, f), nn.GELU(), nn.LayerNorm(f), nn.Linear(f, d)

    def forward(self, x):
        return x + self.fc2(self.norm(self.act(self.fc1(x))))


class _Head(nn.Module):
    """BERT's prediction head (dense -> act -> LayerNorm -> vocabulary): not an FFN, no report."""

    def __init__(self, d: int = 16, vocab: int = 50):
        super().__init__()
        self.dense, self.act, self.norm, self.decoder = nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, x):
        return self.decoder(self.norm(self.act(self.dense(x))))


def test_an_ffn_with_a_norm_on_its_hidden_vector_is_a_near_miss_naming_the_norm():
    model = nn.Sequential(_HiddenNormFFN(), _Head()).eval()
    found = upcycle_fx.find_mlps(model, example_inputs=(torch.randn(2, 5, 16),))
    assert list(found) == []
    assert [m.pattern for m in found.near_misses] == ["dense_hidden_norm"]
    assert "a LayerNorm (0.norm) normalises the FFN's hidden vector" in found.near_misses[0].reason


def test_bitnet_sub_norm_is_a_near_miss_naming_it():
    config = transformers.BitNetConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2)
    found = upcycle_fx.find_mlps(transformers.BitNetForCausalLM(config).eval())
    assert list(found) == []
    assert ["gated_hidden_norm"] == [m.pattern for m in found.near_misses]
    assert "BitNetRMSNorm (model.layers.0.mlp.ffn_sub_norm)" in found.near_misses[0].reason


# --------------------------------------------------------------------------- a fused gate split by a view


class _ViewSplitGLU(nn.Module):
    """Moshi's gating MLP: the fused output viewed as [B, T, 2, d_ff], halves by [..., i, :]."""

    def __init__(self, d: int = 16, f: int = 24):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.fc1(x)
        b, t, _ = h.shape
        h = h.view(b, t, 2, -1)
        return x + self.fc2(F.silu(h[..., 0, :]) * h[..., 1, :])


def test_a_fused_gate_split_by_a_view_converts_exactly():
    model = nn.Sequential(_ViewSplitGLU(), _ViewSplitGLU()).eval()
    x = torch.randn(2, 5, 16)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert [(m.kind, m.activation, m.d_ff) for m in found] == [("fused_gated", "silu", 24)] * 2
    sparse = _upcycle(model, example_inputs=(x,)).model
    assert len(upcycle_fx.moe_layers(sparse)) == 2
    with torch.no_grad():
        assert _max_error(sparse(x), model(x)) < TOL


class _ViewNotHalves(nn.Module):
    """view(b, 2, t, -1) does not split each token's vector in two halves: no FFN."""

    def __init__(self, d: int = 16, f: int = 24):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * f, bias=False), nn.Linear(f, d, bias=False)

    def forward(self, x):
        h = self.fc1(x)
        b, t, _ = h.shape
        h = h.reshape(b * t * 2, 2, -1)
        return self.fc2((F.silu(h[..., 0, :]) * h[..., 1, :]).reshape(b, t, -1)[..., :24])


def test_a_view_that_is_not_two_halves_is_not_a_fused_gate():
    found = upcycle_fx.find_mlps(nn.Sequential(_ViewNotHalves()).eval(), example_inputs=(torch.randn(2, 5, 16),))
    assert list(found) == []


# --------------------------------------------------------------------------- constant multipliers


class _ScaledGLU(nn.Module):
    """Falcon-H1's MLP: `down(up(x) * act(gate(x) * a)) * b` with constant multipliers."""

    def __init__(self, d: int = 16, f: int = 24, a: float = 0.5, b: float = 3.0, bias: bool = True):
        super().__init__()
        self.gate, self.up = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
        self.down, self.act = nn.Linear(f, d, bias=bias), nn.SiLU()
        self.a, self.b = a, b

    def forward(self, x):
        return self.down(self.up(x) * self.act(self.gate(x) * self.a)) * self.b


@pytest.mark.parametrize("bias", [True, False])
def test_constant_multipliers_around_a_gated_ffn_keep_the_function(bias):
    """Falcon-H1: the gate's multiplier is part of the element-wise activation chain, the output's
    stays outside the MoE."""
    model = nn.Sequential(_ScaledGLU(bias=bias), _ScaledGLU(a=2.0, b=0.25, bias=bias)).eval()
    x = torch.randn(2, 5, 16)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert [(m.kind, m.paths) for m in found] == [("gated", (f"{i}.gate", f"{i}.up", f"{i}.down")) for i in range(2)]
    sparse = _upcycle(model, example_inputs=(x,)).model
    assert len(upcycle_fx.moe_layers(sparse)) == 2
    with torch.no_grad():
        assert _max_error(sparse(x), model(x)) < TOL


# --------------------------------------------------------------------------- BLOOM


def test_bloom_needs_nothing_structural_once_its_activation_is_known(monkeypatch):
    """BLOOM's MLP takes the residual as a second input, so no module holds exactly the FFN:
    the MoE takes dense_h_to_4h's place and the rest folds into it. Its only obstacle is its
    activation module (BloomGelu), named here."""
    from transformers.models.bloom.modeling_bloom import BloomGelu

    from upcycle_fx.patterns import vocabulary

    monkeypatch.setitem(vocabulary._registered_activations, BloomGelu, "gelu_tanh")
    config = transformers.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(config).eval()
    result = _upcycle(model)
    assert [name for name, _ in upcycle_fx.moe_layers(result.model)] == [
        f"transformer.h.{i}.mlp.dense_h_to_4h" for i in range(2)]
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_error(result.model(ids).logits, model(ids).logits) < TOL


def test_every_other_mlp_takes_albert_shared_ffn():
    """ALBERT's one FFN serves every block: the default pattern converts it (one shared MoE) and
    says why, instead of selecting nothing."""
    config = transformers.AlbertConfig(vocab_size=100, embedding_size=32, hidden_size=32, num_hidden_layers=4,
                                       num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    model = transformers.AlbertModel(config).eval()
    result = upcycle_fx.upcycle(model)
    assert [name for name, _ in upcycle_fx.moe_layers(result.model)] == ["encoder.albert_layer_groups.0.albert_layers.0.ffn"]
    assert result.verified_error is not None and result.verified_error <= 1e-5
    assert "shared by all 4 calls" in upcycle_fx.find_mlps(model).explain()
