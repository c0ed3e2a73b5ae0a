"""Random FFN-bearing models, one `ModelSpec` each: an FFN style, sizes, and a twist.

Every model is a stack of residual blocks `x + ffn(norm(x))` followed by a linear head, fed a
float tensor `[batch, seq, d]`. The FFN styles are the ones the README lists (nn.Sequential,
up/act/down modules, SwiGLU/GeGLU, fused gate_up split by `chunk` or by slicing, `F.linear` on
raw parameters, an FFN written inline in the block's forward, BERT's FFN split across two
modules). A twist makes the model harder in one way users hit: a projection that is not a
plain linear map (an `nn.Linear` subclass with its own forward, hooks, parametrised weights),
BatchNorm or dropout in train mode, a block whose plain attributes the parent reads, a
projection weight read outside the FFN. `repr(spec)` is a reproducer: `eval(repr(spec)).build()`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize, weight_norm

STYLES = ("sequential", "dense", "gated", "fused_chunk", "fused_slice", "functional", "inline",
          "bert_split")
DENSE_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "relu2")
GATE_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "sigmoid")
# Twists that keep the model a plain FFN model (the result must be exact).
PLAIN_TWISTS = ("none", "plain_subclass", "observer_hook", "dropout_train", "block_attrs")
# Twists that change what a projection computes (exact only if honoured; else a named error).
PROJECTION_TWISTS = ("scaled_subclass", "forward_hook", "pre_hook", "spectral_norm", "weight_norm",
                     "legacy_weight_norm", "parametrize")
# Twists that touch state or structure the rewrite must leave alone or keep working.
STATE_TWISTS = ("batchnorm_train", "weight_read")
TWISTS = PLAIN_TWISTS + PROJECTION_TWISTS + STATE_TWISTS

_ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu2": lambda x: torch.relu(x) ** 2,
    "sigmoid": torch.sigmoid,
}
_ACTIVATION_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
                       "silu": nn.SiLU}


def activation(name: str):
    return _ACTIVATIONS[name]


# --------------------------------------------------------------------------- FFNs


class DenseFFN(nn.Module):
    """`down(act(up(x)))` with module projections."""

    def __init__(self, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.act_name = act
        self.up = nn.Linear(d, f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down(activation(self.act_name)(self.up(x)))


class GatedFFN(nn.Module):
    """SwiGLU / GeGLU: `down(act(gate(x)) * up(x))`."""

    def __init__(self, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.act_name = act
        self.gate = nn.Linear(d, f, bias=bias)
        self.up = nn.Linear(d, f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down(activation(self.act_name)(self.gate(x)) * self.up(x))


class FusedChunkFFN(nn.Module):
    """Fused `gate_up` split with `chunk`: `down(act(g) * u)`."""

    def __init__(self, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.act_name = act
        self.gate_up = nn.Linear(d, 2 * f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(activation(self.act_name)(gate) * up)


class FusedSliceFFN(nn.Module):
    """Fused input projection split by slicing: `down(act(h[..., :f]) * h[..., f:])`."""

    def __init__(self, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.act_name, self.f = act, f
        self.w_in = nn.Linear(d, 2 * f, bias=bias)
        self.w_out = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        h = self.w_in(x)
        return self.w_out(activation(self.act_name)(h[..., : self.f]) * h[..., self.f:])


class FunctionalFFN(nn.Module):
    """`F.linear` on raw parameters."""

    def __init__(self, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.act_name = act
        self.w1 = nn.Parameter(torch.randn(f, d) * d ** -0.5)
        self.w2 = nn.Parameter(torch.randn(d, f) * f ** -0.5)
        self.b1 = nn.Parameter(torch.randn(f) * 0.1) if bias else None
        self.b2 = nn.Parameter(torch.randn(d) * 0.1) if bias else None

    def forward(self, x):
        return F.linear(activation(self.act_name)(F.linear(x, self.w1, self.b1)), self.w2, self.b2)


class BertIntermediate(nn.Module):
    def __init__(self, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.act_name = act
        self.dense = nn.Linear(d, f, bias=bias)

    def forward(self, x):
        return activation(self.act_name)(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, d: int, f: int, bias: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(f, d, bias=bias)
        self.dropout = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(d)

    def forward(self, h, x):
        return self.norm(self.dropout(self.dense(h)) + x)


# --------------------------------------------------------------------------- blocks


class TokenBatchNorm(nn.Module):
    """BatchNorm1d over the tokens of a `[batch, seq, d]` tensor (running stats as buffers)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(d)

    def forward(self, x):
        return self.bn(x.flatten(0, 1)).view_as(x)


class Block(nn.Module):
    """`x + ffn(norm(x))`, the FFN a module of its own."""

    def __init__(self, norm: nn.Module, ffn: nn.Module) -> None:
        super().__init__()
        self.norm, self.ffn = norm, ffn
        self.out_scale = 1.0  # a plain attribute the parent may read

    def gain(self) -> float:
        return self.out_scale

    def forward(self, x):
        return x + self.ffn(self.norm(x))


class InlineBlock(nn.Module):
    """The FFN written inline with functional ops: no module holds it alone."""

    def __init__(self, norm: nn.Module, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.norm, self.act_name = norm, act
        self.up = nn.Linear(d, f, bias=bias)
        self.down = nn.Linear(f, d, bias=bias)
        self.spare = nn.Linear(d, d)  # a submodule the forward does not use
        self.out_scale = 1.0

    def gain(self) -> float:
        return self.out_scale

    def forward(self, x):
        h = F.dropout(activation(self.act_name)(self.up(self.norm(x))), 0.1, self.training)
        return x + self.down(h)


class BertBlock(nn.Module):
    """BERT's FFN: `intermediate` (dense + act) then `output` (dense + dropout + LayerNorm)."""

    def __init__(self, d: int, f: int, bias: bool, act: str) -> None:
        super().__init__()
        self.intermediate = BertIntermediate(d, f, bias, act)
        self.output = BertOutput(d, f, bias)
        self.out_scale = 1.0

    def gain(self) -> float:
        return self.out_scale

    def forward(self, x):
        return self.output(self.intermediate(x), x)


class FuzzNet(nn.Module):
    """Blocks then a linear head; optionally reads block attributes or an FFN weight."""

    def __init__(self, blocks: list[nn.Module], d: int, read_attrs: bool, read_weight: str | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(d, d)
        self.read_attrs = read_attrs
        self.read_weight = read_weight  # dotted path of a projection weight in block 0
        self.clamp_value: float | None = None  # T5-style clamp of block and head outputs

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
            if self.clamp_value is not None:
                x = x.clamp(-self.clamp_value, self.clamp_value)
            if self.read_attrs:  # plain attribute, method and (inline blocks) an otherwise unused submodule
                x = x * block.out_scale * block.gain()
                if isinstance(block, InlineBlock):
                    x = x + block.spare(x) * 0.0
        if self.read_weight is not None:
            x = x + self.blocks[0].get_parameter(self.read_weight).mean()
        x = self.head(x)
        if self.clamp_value is not None:
            x = x.clamp(-self.clamp_value, self.clamp_value)
        return x


# --------------------------------------------------------------------------- twists


class ScaledLinear(nn.Linear):
    """An `nn.Linear` subclass whose forward is not the plain linear map."""

    def forward(self, x):
        return super().forward(x) * 2


class PlainSubclassLinear(nn.Linear):
    """An `nn.Linear` subclass that does not override forward (a plain linear map)."""


class HalfScale(nn.Module):
    """A parametrisation: the effective weight is half the stored one."""

    def forward(self, weight):
        return weight * 0.5


def _double_output(module, args, output):
    return output * 2


def _double_input(module, args):
    return (args[0] * 2,)


def _observe(module, args, output):
    return None


@dataclass(frozen=True)
class Projection:
    """Where a block's first FFN projection lives: module path in the block and weight name."""

    module: str
    weight: str


_LAST_PROJECTION = {
    "sequential": Projection("ffn.2", "weight"), "dense": Projection("ffn.down", "weight"),
    "gated": Projection("ffn.down", "weight"), "fused_chunk": Projection("ffn.down", "weight"),
    "fused_slice": Projection("ffn.w_out", "weight"), "functional": Projection("ffn", "w2"),
    "inline": Projection("down", "weight"), "bert_split": Projection("output.dense", "weight"),
}
_FIRST_PROJECTION = {
    "sequential": Projection("ffn.0", "weight"), "dense": Projection("ffn.up", "weight"),
    "gated": Projection("ffn.gate", "weight"), "fused_chunk": Projection("ffn.gate_up", "weight"),
    "fused_slice": Projection("ffn.w_in", "weight"), "functional": Projection("ffn", "w1"),
    "inline": Projection("up", "weight"), "bert_split": Projection("intermediate.dense", "weight"),
}


def twists_for(style: str) -> tuple[str, ...]:
    """The twists that make sense for `style` (no Linear subclass where there is no Linear)."""
    if style == "functional":
        return tuple(t for t in TWISTS if t not in ("scaled_subclass", "plain_subclass"))
    return TWISTS


def _swap_class(block: nn.Module, path: str, cls: type[nn.Linear]) -> None:
    old = block.get_submodule(path)
    new = cls(old.in_features, old.out_features, bias=old.bias is not None)
    new.load_state_dict(old.state_dict())
    parent, _, name = path.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, name, new)


def _apply_twist(block: nn.Module, style: str, twist: str, target: str) -> None:
    if twist not in PROJECTION_TWISTS + ("plain_subclass", "observer_hook"):
        return
    proj = (_FIRST_PROJECTION if target == "first" else _LAST_PROJECTION)[style]
    module = block.get_submodule(proj.module)
    if twist == "scaled_subclass":
        _swap_class(block, proj.module, ScaledLinear)
    elif twist == "plain_subclass":
        _swap_class(block, proj.module, PlainSubclassLinear)
    elif twist == "forward_hook":
        module.register_forward_hook(_double_output)
    elif twist == "pre_hook":
        module.register_forward_pre_hook(_double_input)
    elif twist == "observer_hook":
        module.register_forward_hook(_observe)
    elif twist == "spectral_norm":
        parametrizations.spectral_norm(module, name=proj.weight)
    elif twist == "weight_norm":
        parametrizations.weight_norm(module, name=proj.weight)
        getattr(module.parametrizations, proj.weight).original0.data.mul_(0.5)  # g: not the identity
    elif twist == "legacy_weight_norm":  # hook-based; `weight` is recomputed by a pre-hook
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            weight_norm(module, name=proj.weight)
        getattr(module, f"{proj.weight}_g").data.mul_(0.5)  # as after an optimiser step
    elif twist == "parametrize":
        parametrize.register_parametrization(module, proj.weight, HalfScale())


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """One random model. `build()` is deterministic in `seed`."""

    style: str = "dense"
    d: int = 16
    f: int = 24
    layers: int = 2
    bias: bool = True
    act: str = "gelu"
    twist: str = "none"
    norm: str = "layernorm"  # "layernorm" | "none"
    seed: int = 0
    dtype: str = "float32"
    mode: str = "eval"  # the mode the user's model is in ("train" for the *_train twists)
    clamp: bool = False  # clamp block outputs below the dtype's overflow, as T5 does in fp16
    target: str = "first"  # the FFN projection a projection twist applies to: "first" | "last"

    def build(self) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            blocks = [self._block() for _ in range(self.layers)]
            for block in blocks:
                _apply_twist(block, self.style, self.twist, self.target)
            read_weight = None
            if self.twist == "weight_read":
                proj = _FIRST_PROJECTION[self.style]
                read_weight = f"{proj.module}.{proj.weight}".removeprefix(".")
            model = FuzzNet(blocks, self.d, read_attrs=self.twist == "block_attrs", read_weight=read_weight)
        model = model.to(getattr(torch, self.dtype))
        if self.clamp:
            model.clamp_value = torch.finfo(getattr(torch, self.dtype)).max * 0.99
        model.train(self.mode == "train" or self.twist in ("batchnorm_train", "dropout_train"))
        return model

    def inputs(self, batch: int = 2, seq: int = 5, scale: float = 1.0, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, seq, self.d, generator=generator) * scale
        return x.to(getattr(torch, self.dtype))

    def _norm(self) -> nn.Module:
        if self.twist == "batchnorm_train":
            return TokenBatchNorm(self.d)
        return nn.LayerNorm(self.d) if self.norm == "layernorm" else nn.Identity()

    def _block(self) -> nn.Module:
        d, f, bias, act = self.d, self.f, self.bias, self.act
        if self.style == "inline":
            return InlineBlock(self._norm(), d, f, bias, act)
        if self.style == "bert_split":
            return BertBlock(d, f, bias, act)
        if self.style == "sequential":
            ffn = nn.Sequential(nn.Linear(d, f, bias=bias), _ACTIVATION_MODULES[act](),
                                nn.Linear(f, d, bias=bias))
        elif self.style == "dense":
            ffn = DenseFFN(d, f, bias, act)
        elif self.style == "gated":
            ffn = GatedFFN(d, f, bias, act)
        elif self.style == "fused_chunk":
            ffn = FusedChunkFFN(d, f, bias, act)
        elif self.style == "fused_slice":
            ffn = FusedSliceFFN(d, f, bias, act)
        elif self.style == "functional":
            ffn = FunctionalFFN(d, f, bias, act)
        else:
            raise ValueError(f"unknown FFN style {self.style!r}")
        if self.twist == "dropout_train":
            ffn = nn.Sequential(ffn, nn.Dropout(0.1)) if self.style != "sequential" else ffn
        return Block(self._norm(), ffn)


def activations_for(style: str) -> tuple[str, ...]:
    if style in ("gated", "fused_chunk", "fused_slice"):
        return GATE_ACTIVATIONS
    if style == "sequential":
        return tuple(_ACTIVATION_MODULES)
    return DENSE_ACTIVATIONS
