"""The vocabulary the FFN patterns are written in: what each FX node *means*.

Every node gets one label: `linear` (a projection), `elem` (an elementwise unary op, chained
into an activation), `mul`, `part` (one half of a split projection output), `through`
(dropout / identity: contracted away) or `other`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

LINEAR, ELEM, MUL, PART, THROUGH, OTHER = "linear", "elem", "mul", "part", "through", "other"

# Names of whole FFN activations the patterns accept (DESIGN §2; the report and ONNX use them).
FFN_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "gelu_fast", "gelu_quick", "silu", "relu2", "sigmoid")

# Activation module classes by class name (torch.nn, transformers.activations, timm).
_ACTIVATION_CLASSES: dict[str, str] = {
    "ReLU": "relu", "SiLU": "silu", "Swish": "silu", "SiLUActivation": "silu", "Sigmoid": "sigmoid",
    "GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh", "GELUPytorchTanh": "gelu_tanh", "AccurateGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_fast", "QuickGELUActivation": "gelu_quick", "QuickGELU": "gelu_quick",
    "ReLUSquaredActivation": "relu2", "SquaredReLU": "relu2", "Tanh": "tanh", "Mish": "mish",
    "MishActivation": "mish", "ReLU6": "relu6", "LeakyReLU": "leaky_relu", "Hardswish": "hardswish",
}
_ACTIVATION_FUNCTIONS: dict[Callable, str] = {
    F.relu: "relu", torch.relu: "relu", F.silu: "silu", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", torch.square: "square", F.mish: "mish",
}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh", "square": "square"}
# Chains of elementary ops that make one named activation.
_CHAINS = {("relu", "square"): "relu2"}

_DROPOUT_FUNCTIONS = (F.dropout, torch.dropout)
_SPLITS = {"chunk": "chunks", "split": "split_size", torch.chunk: "chunks", torch.split: "split_size_or_sections"}
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)

_registered_activations: dict[type, str] = {}


def register_activation(module_class: type, name: str) -> None:
    """Teach the patterns an activation module class (e.g. your own GELU, or `nn.Mish`): its
    modules become activation nodes named `name`, and FFNs using them are accepted. The module
    itself is copied into the experts, so any name is safe; kernels that compute activations by
    name (ONNX's fused MoE, the Triton decode kernel) run only names they know, after a probe."""
    from ..errors import UpcycleConfigError

    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise UpcycleConfigError(f"register_activation: {module_class!r} is not an nn.Module class.")
    if not (isinstance(name, str) and name.isidentifier()):
        raise UpcycleConfigError(f"register_activation: name {name!r} must be an identifier such as 'mish'.")
    _registered_activations[module_class] = name


def is_ffn_activation(name: str) -> bool:
    """A built-in FFN activation, or one named by `register_activation`."""
    return name in FFN_ACTIVATIONS or name in _registered_activations.values()


def activation_of_module(module: nn.Module) -> str | None:
    for cls, name in _registered_activations.items():
        if isinstance(module, cls):
            return name
    name = _ACTIVATION_CLASSES.get(type(module).__name__)
    if name == "gelu" or type(module).__name__ == "GELU":
        approximate = getattr(module, "approximate", "none")
        return "gelu_tanh" if approximate == "tanh" else "gelu"
    return name


def activation_name(ops: tuple[str, ...]) -> str:
    """Name of a chain of elementary activation ops: ('relu', 'square') -> 'relu2'."""
    if len(ops) == 1:
        return ops[0]
    return _CHAINS.get(ops, "+".join(ops))


@dataclass(frozen=True)
class Projection:
    """A projection node and where its weights live in the user's model."""

    node: fx.Node
    owner: str            # module path (absolute) of the weight's owner
    weight: str           # attribute name on the owner
    bias: str | None
    style: str            # "linear" | "conv1d" | "functional"
    in_features: int
    out_features: int

    @property
    def transposed(self) -> bool:
        """Conv1D keeps its weight as [in, out], the transpose of nn.Linear's [out, in]."""
        return self.style == "conv1d"

    def tensors(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight in the nn.Linear [out, in] layout, bias) read from `model`."""
        owner = model.get_submodule(self.owner)
        weight = getattr(owner, self.weight)
        weight = weight.t() if self.transposed else weight
        return weight, (None if self.bias is None else getattr(owner, self.bias))


def projection_tensors(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight in the nn.Linear [out, in] layout, bias) of a projection module (nn.Linear or
    HF Conv1D, whose weight is stored [in, out])."""
    weight = module.weight if isinstance(module, nn.Linear) else module.weight.t()
    return weight, getattr(module, "bias", None)


@dataclass(frozen=True)
class Part:
    """A getitem taking one part of a split projection output along the last dim."""

    index: int | None = None     # chunk/split style: part number
    start: int | None = None     # slice style: [start:stop]
    stop: int | None = None


@dataclass(frozen=True)
class NodeMeaning:
    label: str
    projection: Projection | None = None
    op: str | None = None                   # elementary activation name (label elem)
    dropout: float | None = None            # p of a dropout (label through)
    part: Part | None = None


def _constant_args_except_first(node: fx.Node) -> bool:
    return len(node.all_input_nodes) == 1 and node.args and isinstance(node.args[0], fx.Node)


def _is_square(node: fx.Node) -> bool:
    return (node.target in (operator.pow, torch.pow, "pow") and len(node.args) == 2
            and isinstance(node.args[0], fx.Node) and node.args[1] == 2)


def classify(node: fx.Node, module_of: Callable[[str], nn.Module], absolute: Callable[[str], str]) -> NodeMeaning:
    """Label one node; `module_of` resolves call_module targets, `absolute` makes paths absolute."""
    from ..capture.leaves import is_projection_module

    if node.op == "call_module":
        module = module_of(node.target)
        if is_projection_module(module):
            conv1d = not isinstance(module, nn.Linear)
            out_f, in_f = projection_tensors(module)[0].shape
            bias = "bias" if getattr(module, "bias", None) is not None else None
            return NodeMeaning(LINEAR, Projection(node, absolute(node.target), "weight", bias,
                                                  "conv1d" if conv1d else "linear", int(in_f), int(out_f)))
        if isinstance(module, nn.Dropout):
            return NodeMeaning(THROUGH, dropout=float(module.p))
        if isinstance(module, nn.Identity):
            return NodeMeaning(THROUGH, dropout=0.0)
        act = activation_of_module(module)
        if act is not None:
            return NodeMeaning(ELEM, op=act)
        return NodeMeaning(OTHER)
    if node.op == "call_function":
        if node.target in _LINEAR_FUNCTIONS:
            return _functional_projection(node, module_of, absolute)
        if node.target in _DROPOUT_FUNCTIONS:
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            return NodeMeaning(THROUGH, dropout=float(p))
        if node.target is F.gelu and _constant_args_except_first(node):
            tanh = node.kwargs.get("approximate", "none") == "tanh"
            return NodeMeaning(ELEM, op="gelu_tanh" if tanh else "gelu")
        if node.target in _ACTIVATION_FUNCTIONS and _constant_args_except_first(node):
            return NodeMeaning(ELEM, op=_ACTIVATION_FUNCTIONS[node.target])
        if _is_square(node):
            return NodeMeaning(ELEM, op="square")
        if node.target in (operator.mul, torch.mul) and len(node.all_input_nodes) == 2:
            return NodeMeaning(MUL)
        if node.target is operator.getitem:
            return _part(node)
        if split_spec(node) is not None:
            return NodeMeaning(THROUGH)
        return NodeMeaning(OTHER)
    if node.op == "call_method":
        if node.target in _ACTIVATION_METHODS and _constant_args_except_first(node):
            return NodeMeaning(ELEM, op=_ACTIVATION_METHODS[node.target])
        if _is_square(node):
            return NodeMeaning(ELEM, op="square")
        if node.target == "mul" and len(node.all_input_nodes) == 2:
            return NodeMeaning(MUL)
        if split_spec(node) is not None:
            return NodeMeaning(THROUGH)
        return NodeMeaning(OTHER)
    return NodeMeaning(OTHER)


def split_spec(node: fx.Node) -> tuple[str, object] | None:
    """("chunk", n) or ("split", size) for x.chunk(n, -1) / torch.split(x, size, -1) and the
    like along the last dimension; None for anything else."""
    if node.op not in ("call_method", "call_function") or node.target not in _SPLITS:
        return None
    kind = "chunk" if node.target in ("chunk", torch.chunk) else "split"
    args = node.args
    amount = node.kwargs.get(_SPLITS[node.target], args[1] if len(args) > 1 else None)
    dim = node.kwargs.get("dim", args[2] if len(args) > 2 else 0)
    shadow = args[0].meta.get("shadow") if isinstance(args[0], fx.Node) else None
    last = dim == -1 or (isinstance(shadow, torch.Tensor) and dim == shadow.dim() - 1)
    return (kind, amount) if last else None


def _part(node: fx.Node) -> NodeMeaning:
    source, index = node.args
    if not isinstance(source, fx.Node):
        return NodeMeaning(OTHER)
    if split_spec(source) is not None:
        return NodeMeaning(PART, part=Part(index=index)) if isinstance(index, int) else NodeMeaning(OTHER)
    last = _last_dim_slice(index, source)
    if last is not None:
        return NodeMeaning(PART, part=Part(start=last.start, stop=last.stop))
    return NodeMeaning(OTHER)


def _last_dim_slice(index: Any, source: fx.Node) -> slice | None:
    """`x[..., a:b]`, or `x[:, :, a:b]` when the shadow confirms it is the last dim."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    last, leading = index[-1], index[:-1]
    if last.step not in (None, 1):
        return None
    if leading and leading[0] is Ellipsis and all(s == slice(None) for s in leading[1:]):
        return last
    shadow = source.meta.get("shadow")
    full = all(s == slice(None) for s in leading)
    if full and isinstance(shadow, torch.Tensor) and shadow.dim() == len(index):
        return last
    return None


def _functional_projection(node: fx.Node, module_of, absolute) -> NodeMeaning:
    """F.linear(x, W, b) with W (and b) parameters read by get_attr."""
    args = list(node.args) + [None] * (3 - len(node.args))
    weight, bias = args[1], node.kwargs.get("bias", args[2])
    if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
        return NodeMeaning(OTHER)
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
        return NodeMeaning(OTHER)
    owner_rel, _, weight_name = weight.target.rpartition(".")
    if bias is not None and bias.target.rpartition(".")[0] != owner_rel:
        return NodeMeaning(OTHER)
    tensor = getattr(module_of(owner_rel), weight_name)
    if tensor.dim() != 2:
        return NodeMeaning(OTHER)
    out_f, in_f = tensor.shape
    bias_name = None if bias is None else bias.target.rpartition(".")[2]
    return NodeMeaning(LINEAR, Projection(node, absolute(owner_rel), weight_name, bias_name,
                                          "functional", int(in_f), int(out_f)))
