"""The vocabulary the FFN patterns are written in: what each FX node *means*.

Every node gets one label: `linear` (a projection), `elem` (an elementwise unary op, chained
into an activation), `mul`, `part` (one half of a split projection output), `through`
(dropout / identity: contracted away) or `other`. Activation names come from the records of
`upcycle_fx.activations`; a module, or a call on a projection's output, without a record is
`elem` under its own name where the element-wise probe (`activations/elementwise.py`) vouches
for it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..activations import elementwise, records

LINEAR, ELEM, MUL, PART, THROUGH, OTHER = "linear", "elem", "mul", "part", "through", "other"


class _FFNActivationNames(Sequence):
    """Names of the registered activations an FFN may have (a live view of the registry)."""

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n in records.activation_names() if records.is_ffn_activation(n))

    def __getitem__(self, index):
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


FFN_ACTIVATIONS = _FFNActivationNames()

_DROPOUT_FUNCTIONS = (F.dropout, torch.dropout)
_SPLITS = {"chunk": "chunks", "split": "split_size", torch.chunk: "chunks", torch.split: "split_size_or_sections"}
_LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear)

_registered_activations: dict[type, str] = {}


def register_activation(module_class: type, name: str) -> None:
    """Name an activation module class (e.g. your own GELU): its modules become activation nodes
    named `name`. Element-wise modules are recognised without it (named by their class); a name
    with a record (`upcycle_fx.activations`) gives the fast paths (the Triton decode kernel, ONNX's
    fused MoE), which run it only after a probe shows the module computes that record."""
    from ..errors import UpcycleConfigError

    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise UpcycleConfigError(f"register_activation: {module_class!r} is not an nn.Module class.")
    if not (isinstance(name, str) and name.isidentifier()):
        raise UpcycleConfigError(f"register_activation: name {name!r} must be an identifier such as 'mish'.")
    _registered_activations[module_class] = name


def is_ffn_activation(name: str) -> bool:
    """Whether an FFN may have this activation: any element-wise one except a record marked as
    no FFN activation by itself (tanh: poolers and heads)."""
    return records.is_ffn_activation(name)


def activation_of_module(module: nn.Module) -> str | None:
    """The activation a module computes: a registered class's name, the record its class spells,
    or its class name where a probe shows it is element-wise; None for anything else."""
    for cls, name in _registered_activations.items():
        if isinstance(module, cls):
            return name
    name = records.name_of_module(module)
    if name is not None:
        return name
    from ..capture.leaves import is_projection_module

    if is_projection_module(module) or isinstance(module, (nn.Dropout, nn.Identity)):
        return None
    return type(module).__name__ if elementwise.module_problem(module) is None else None


def activation_name(ops: tuple[str, ...]) -> str:
    """Name of a chain of elementary activation ops: ('relu', 'square') -> 'relu2'."""
    if len(ops) == 1:
        return ops[0]
    return records.name_of_chain(ops) or "+".join(ops)


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
        if node.target in (operator.mul, torch.mul) and len(node.all_input_nodes) == 2:
            return NodeMeaning(MUL)
        if node.target is operator.getitem:
            return _part(node)
        if split_spec(node) is not None:
            return NodeMeaning(THROUGH)
        return _unary_call(node, module_of)
    if node.op == "call_method":
        if node.target == "mul" and len(node.all_input_nodes) == 2:
            return NodeMeaning(MUL)
        if split_spec(node) is not None:
            return NodeMeaning(THROUGH)
        return _unary_call(node, module_of)
    return NodeMeaning(OTHER)


def _unary_call(node: fx.Node, module_of: Callable[[str], nn.Module]) -> NodeMeaning:
    """A call on one tensor (its other arguments constant): the activation record it spells; or,
    where it works on a projection's output, its own name if a probe shows it is element-wise
    (`x * 0.5`, `2 * x`, `torch.erf(x)`, a wrapped function)."""
    inputs = node.all_input_nodes
    if len(inputs) != 1 or [a for a in node.args if a is inputs[0]] != [inputs[0]]:
        return NodeMeaning(OTHER)
    source, args, kwargs = inputs[0], tuple(node.args), dict(node.kwargs)
    if args[0] is source:
        name = records.name_of_call(node.target, args[1:], kwargs)
        if name is not None:
            return NodeMeaning(ELEM, op=name)
    own_name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if not isinstance(own_name, str) or "dropout" in own_name or not _fed_by_projection(source, module_of):
        return NodeMeaning(OTHER)  # (a dropout function's training flag is baked into the graph)
    if node.op == "call_method" and args[0] is not source:
        return NodeMeaning(OTHER)

    def call(t: torch.Tensor):
        given = [t if a is source else a for a in args]
        if node.op == "call_method":
            return getattr(given[0], node.target)(*given[1:], **kwargs)
        return node.target(*given, **kwargs)

    key = (node.op, node.target, repr([None if a is source else a for a in args]), repr(sorted(kwargs.items())))
    if elementwise.call_problem(call, key, source.meta.get("shadow")) is not None:
        return NodeMeaning(OTHER)
    return NodeMeaning(ELEM, op=own_name)


def _fed_by_projection(source: fx.Node, module_of: Callable[[str], nn.Module], depth: int = 16) -> bool:
    """Whether `source` is a projection's output, or comes from one through single-input nodes."""
    from ..capture.leaves import is_projection_module

    for _ in range(depth):
        if source.op == "call_module" and is_projection_module(module_of(source.target)):
            return True
        if source.op == "call_function" and source.target in _LINEAR_FUNCTIONS:
            return True
        if len(source.all_input_nodes) != 1:
            return False
        source = source.all_input_nodes[0]
    return False


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


def activation_tensor_names(nodes: list[fx.Node], region) -> list[str]:
    """Absolute names of the parameters and buffers of an FFN's activation modules (xIELU's
    alphas and constants): what a conversion must read besides the projections' weights."""
    names = []
    for node in nodes:
        if node.op == "call_module":
            path = region.absolute(node.target)
            module = region.module(node.target)
            names += [f"{path}.{n}" if path else n for n, _ in module.named_parameters()]
            names += [f"{path}.{n}" if path else n for n, _ in module.named_buffers()]
    return names
