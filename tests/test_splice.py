"""FFNs written inline with functional ops are spliced into a re-traced graph of their block."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import upcycle_fx
from upcycle_fx.passes.splice import is_spliced


class InlineBlock(nn.Module):
    """Pre-norm block whose FFN is inline: functional GELU and functional dropouts."""

    def __init__(self, d=16, f=40, hidden_dropout=0.0):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, f), nn.Linear(f, d)
        self.hidden_dropout = hidden_dropout

    def forward(self, x):
        h = F.gelu(self.up(self.norm(x)), approximate="tanh")
        h = F.dropout(h, self.hidden_dropout, self.training)
        out = x + F.dropout(self.down(h), p=0.2, training=self.training)
        return out + F.dropout(x, 0.1, False)  # a constant flag: must stay off in training


class InlineGatedBlock(nn.Module):
    """SwiGLU written inline in the block, no MLP module."""

    def __init__(self, d=16, f=24):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, f, bias=False), nn.Linear(f, d, bias=False), nn.Linear(d, f, bias=False)

    def forward(self, x):
        return x + self.w2(F.silu(self.w1(x)) * self.w3(x))


def _stack(block, n=4):
    torch.manual_seed(0)
    return nn.Sequential(*[block() for _ in range(n)]).eval()


def test_inline_dense_ffn_is_spliced_and_exact():
    """The block runs a re-traced graph calling the MoE; outputs equal the dense model's."""
    dense = _stack(InlineBlock)
    sparse = upcycle_fx.rewrite(dense, router_init_std=1.0)
    assert is_spliced(sparse[1]) and not is_spliced(sparse[0])
    assert isinstance(sparse[1].moe_0, upcycle_fx.MoE)
    assert type(sparse[1]).__name__ == "InlineBlock"
    for shape in ((2, 5, 16), (7, 16)):
        x = torch.randn(shape)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


def test_inline_gated_ffn_is_spliced_and_exact():
    dense = _stack(InlineGatedBlock)
    found = upcycle_fx.find_mlps(dense)
    assert [m.kind for m in found] == ["gated"] * 4
    sparse = upcycle_fx.rewrite(dense, "all", router_init_std=1.0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)
    assert len(upcycle_fx.moe_layers(sparse)) == 4


def test_functional_dropout_still_follows_train_and_eval():
    """`F.dropout(..., training=self.training)` keeps following the mode after the splice (same
    random stream as the dense model when the FFN has no inner dropout), and a constant
    `training=False` stays off."""
    dense = _stack(InlineBlock)
    sparse = upcycle_fx.rewrite(dense, router_init_std=1.0)
    x = torch.randn(4, 16)
    dense.train(), sparse.train()
    torch.manual_seed(1)
    reference = dense(x)
    torch.manual_seed(1)
    upcycled = sparse(x)
    torch.testing.assert_close(upcycled, reference, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(sparse(x), upcycled)  # dropout is really active in training
    sparse.eval()
    torch.testing.assert_close(sparse(x), sparse(x))
    assert "training = False" in sparse[1].spliced_code  # the constant flag survived


def test_inner_functional_dropout_moves_into_the_experts():
    """Dropout between activation and down projection becomes the experts' hidden dropout."""
    dense = _stack(lambda: InlineBlock(hidden_dropout=0.25))
    sparse = upcycle_fx.rewrite(dense)
    assert sparse[1].moe_0.experts.hidden_dropout == 0.25


def test_spliced_model_trains():
    """Gradients reach experts and router through the spliced graph."""
    sparse = upcycle_fx.rewrite(_stack(InlineGatedBlock), seed=0).train()
    loss = sparse(torch.randn(8, 16)).square().mean() + upcycle_fx.aux_loss(sparse)
    loss.backward()
    for _, moe in upcycle_fx.moe_layers(sparse):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.parameters())


class RichBlock(InlineBlock):
    """An inline-FFN block with what a traced forward does not use: a plain attribute, a method,
    an unused submodule and a hook; its parent reads the attribute."""

    def __init__(self):
        super().__init__()
        self.residual_scale = 0.5
        self.spare = nn.Linear(4, 4)

    def scaled(self, y):
        return y * self.residual_scale


class RichNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([RichBlock() for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block.scaled(block(x))
        return x


def test_spliced_block_keeps_attributes_methods_submodules_and_hooks():
    """Before: the block became a GraphModule without `residual_scale`/`scaled`/`spare`, and the
    first forward (inside rewrite, with example inputs) raised AttributeError."""
    torch.manual_seed(0)
    dense = RichNet().eval()
    calls = []
    dense.blocks[1].register_forward_hook(lambda m, i, o: calls.append(1))
    x = torch.randn(3, 16)
    sparse = upcycle_fx.rewrite(dense, "all", example_inputs=(x,), router_init_std=1.0)
    block = sparse.blocks[1]
    assert is_spliced(block) and isinstance(block, RichBlock) and type(block).__name__ == "RichBlock"
    assert block.residual_scale == 0.5 and isinstance(block.spare, nn.Linear)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)
    calls.clear()
    sparse(x)
    assert calls == [1]  # the block's own hook still runs
    dense_ffn = sum(p.numel() for p in (*dense.blocks[1].up.parameters(), *dense.blocks[1].down.parameters()))
    assert isinstance(block.up, upcycle_fx.FoldedIntoMoE) and isinstance(block.down, upcycle_fx.FoldedIntoMoE)
    params = sum(p.numel() for p in sparse.parameters())
    expected = sum(p.numel() for p in dense.parameters()) - 2 * dense_ffn + sum(
        p.numel() for _, moe in upcycle_fx.moe_layers(sparse) for p in moe.parameters())
    assert params == expected  # the dense FFN is not kept beside the MoE


def test_spliced_block_copies_and_pickles():
    """deepcopy (after a training forward, whose aux loss holds a graph) and torch.save/load of
    the whole model give the same function and the same class."""
    import copy
    import io

    sparse = upcycle_fx.rewrite(_stack(InlineGatedBlock), "all", seed=0)
    x = torch.randn(4, 16)
    sparse.train()(x)
    copied = copy.deepcopy(sparse).eval()
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False).eval()
    sparse.eval()
    for other in (copied, loaded):
        assert is_spliced(other[1]) and type(other[1]).__name__ == "InlineGatedBlock"
        torch.testing.assert_close(other(x), sparse(x), rtol=0, atol=0)


def test_spliced_functional_weights_are_removed():
    """F.linear on raw parameters of the block: those parameters leave the block."""

    class RawBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in, self.w_out = nn.Parameter(torch.randn(24, 16) / 4), nn.Parameter(torch.randn(16, 24) / 5)
            self.gain = nn.Parameter(torch.ones(16))

        def forward(self, x):
            return self.gain * x + F.linear(F.relu(F.linear(x, self.w_in)), self.w_out)

    dense = _stack(RawBlock)
    sparse = upcycle_fx.rewrite(dense, "all", router_init_std=1.0)
    assert {name for name, _ in sparse[0].named_parameters(recurse=False)} == {"gain"}
    x = torch.randn(5, 16)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


class Inner(nn.Module):
    """Traced through (it mixes elements, so it is no element-wise leaf)."""

    def forward(self, x):
        return x + x.flip(-1)


class BlockWithInner(InlineBlock):
    def __init__(self):
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return super().forward(self.inner(x))


def test_hook_inside_a_retraced_block_is_a_rewrite_error():
    """A hook on a module the re-trace runs through would fire once, at capture; the user's
    model is left as it was."""
    dense = _stack(BlockWithInner)
    calls = []
    dense[1].inner.register_forward_hook(lambda m, i, o: calls.append(1))
    with pytest.raises(upcycle_fx.RewriteError, match="1.inner: the FFN inside 1 is written inline"):
        upcycle_fx.rewrite(dense, router_init_std=1.0)
    calls.clear()  # (tracing ran the hook on proxies)
    dense(torch.randn(2, 16))
    assert calls == [1]
    upcycle_fx.rewrite(dense, [0, 2])  # blocks without the hook convert


class ReadsFoldedWeight(nn.Module):
    """The parent reads an inline FFN's weight in code that does not trace (`float(tensor)`), so
    capture goes block by block and cannot see the read."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([InlineBlock() for _ in range(2)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x + float(self.blocks[1].up.weight.mean())


def test_reading_a_folded_weight_is_a_named_error():
    """Before: a raw AttributeError from inside rewrite (or at the first forward)."""
    torch.manual_seed(0)
    dense = ReadsFoldedWeight().eval()
    x = torch.randn(3, 16)
    with pytest.raises(upcycle_fx.RewriteError, match=r"folded into the MoE at 'blocks.1.moe_0'.*'weight'"):
        upcycle_fx.rewrite(dense, "all", example_inputs=(x,))
    sparse = upcycle_fx.rewrite(dense, "all", example_inputs=(x,), verify=False)
    with pytest.raises(upcycle_fx.RewriteError, match="no longer exists"):
        sparse(x)
    assert getattr(sparse.blocks[1].up, "weight", None) is None and not hasattr(sparse.blocks[1].up, "bias")
