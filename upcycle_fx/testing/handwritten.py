"""Hand-written tiny decoder-only transformers, one per FFN style (pure torch).

Every model here has the same skeleton::

    input_ids -> token embedding + learned positions
              -> 4 x pre-norm block:  x = x + attn(ln1(x));  x = x + mlp(ln2(x))
              -> final LayerNorm -> lm_head (Linear(d, vocab, bias=False)) -> logits

The attention is written inline with ``q_proj``/``k_proj``/``v_proj``/``o_proj``
``nn.Linear`` layers and a causal softmax, so every block holds four Linear layers
that are *not* part of an FFN. Only the FFN (``blocks.<i>.mlp``) changes between the
models. Module paths are therefore ``blocks.<i>.attn.{q,k,v,o}_proj`` and
``blocks.<i>.mlp...``.

All models are traceable by plain :func:`torch.fx.symbolic_trace`: there is no
Python control flow on tensor values or shapes. The sequence length is only used to
slice the learned position table (a parameter, so FX records the slice), and the
causal mask is built with ``ones_like(scores).triu(1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BiasFreeModel",
    "FunctionalLinearModel",
    "SequentialMLPModel",
    "SigmoidGatedModel",
    "SquaredReLUModel",
    "SwiGLUModel",
    "TinyTransformer",
]

VOCAB = 128
D_MODEL = 32
D_FF = 96
N_HEADS = 4
N_LAYERS = 4
MAX_POSITIONS = 64


# --------------------------------------------------------------------------- FFNs


class _FunctionalMLP(nn.Module):
    """Dense FFN on raw parameters: ``F.linear(gelu_tanh(F.linear(x, w1, b1)), w2, b2)``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d_ff, d_model) * d_model**-0.5)
        self.b1 = nn.Parameter(torch.randn(d_ff) * 0.02)
        self.w2 = nn.Parameter(torch.randn(d_model, d_ff) * d_ff**-0.5)
        self.b2 = nn.Parameter(torch.randn(d_model) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, self.w1, self.b1), approximate="tanh"), self.w2, self.b2)


class _BiasFreeMLP(nn.Module):
    """Dense FFN with bias-free projections: ``down(relu(up(x)))``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.act = nn.ReLU()
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class _SquaredReLUMLP(nn.Module):
    """Primer FFN: ``down(relu(up(x)) ** 2)``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)) ** 2)


class _SigmoidGatedMLP(nn.Module):
    """GLU FFN with one fused input projection; the first half is the gate.

    ``h = w_in(x); a, b = h[..., :f], h[..., f:]; w_out(sigmoid(a) * b)``.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.d_ff = d_ff
        self.w_in = nn.Linear(d_model, 2 * d_ff)
        self.w_out = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        a, b = h[..., : self.d_ff], h[..., self.d_ff :]
        return self.w_out(torch.sigmoid(a) * b)


class _SwiGLUMLP(nn.Module):
    """LLaMA-style SwiGLU FFN without biases: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=False)
        self.up = nn.Linear(d_model, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _sequential_mlp(d_model: int, d_ff: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))


# --------------------------------------------------------------------------- skeleton


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o ``nn.Linear`` layers."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError("d_model must be divisible by n_heads")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # [b, s, d] -> [b, h, s, hd]
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q_proj(x))
        k = self._heads(self.k_proj(x))
        v = self._heads(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        # Causal mask built from the scores themselves: no buffer slicing, no Python shape ints.
        future = torch.ones_like(scores[0, 0], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).flatten(-2)
        return self.o_proj(out)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, d_model: int, n_heads: int, mlp: nn.Module) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """Decoder-only LM skeleton; subclasses choose the FFN through ``make_mlp``."""

    def __init__(
        self,
        vocab_size: int = VOCAB,
        d_model: int = D_MODEL,
        d_ff: int = D_FF,
        n_heads: int = N_HEADS,
        n_layers: int = N_LAYERS,
        max_positions: int = MAX_POSITIONS,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_ff = d_ff
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_positions, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, self.make_mlp(d_model, d_ff)) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def make_mlp(self, d_model: int, d_ff: int) -> nn.Module:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.size(1)
        x = self.embed(input_ids) + self.pos[:seq]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


# --------------------------------------------------------------------------- models


class SequentialMLPModel(TinyTransformer):
    """FFN is ``nn.Sequential(Linear(d, f), GELU(), Linear(f, d))``: paths ``mlp.0``, ``mlp.2``."""

    def make_mlp(self, d_model: int, d_ff: int) -> nn.Module:
        return _sequential_mlp(d_model, d_ff)


class FunctionalLinearModel(TinyTransformer):
    """FFN applies ``F.linear`` to raw parameters ``w1 [f,d], b1, w2 [d,f], b2`` (tanh GELU)."""

    def make_mlp(self, d_model: int, d_ff: int) -> nn.Module:
        return _FunctionalMLP(d_model, d_ff)


class BiasFreeModel(TinyTransformer):
    """FFN is ``down(relu(up(x)))`` with ``nn.Linear(bias=False)`` and an ``nn.ReLU`` module."""

    def make_mlp(self, d_model: int, d_ff: int) -> nn.Module:
        return _BiasFreeMLP(d_model, d_ff)


class SquaredReLUModel(TinyTransformer):
    """FFN is Primer's ``down(torch.relu(up(x)) ** 2)``."""

    def make_mlp(self, d_model: int, d_ff: int) -> nn.Module:
        return _SquaredReLUMLP(d_model, d_ff)


class SigmoidGatedModel(TinyTransformer):
    """FFN is a fused GLU: ``w_in: d -> 2f``, slice into gate/up halves, ``w_out(sigmoid(a) * b)``."""

    def make_mlp(self, d_model: int, d_ff: int) -> nn.Module:
        return _SigmoidGatedMLP(d_model, d_ff)


class SwiGLUModel(TinyTransformer):
    """FFN is SwiGLU: ``down(F.silu(gate(x)) * up(x))`` with bias-free ``nn.Linear`` layers."""

    def make_mlp(self, d_model: int, d_ff: int) -> nn.Module:
        return _SwiGLUMLP(d_model, d_ff)
