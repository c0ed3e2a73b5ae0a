"""Functional ops between an FFN's modules, so the module swap also covers BART-style layers.

BART, Whisper, BioGPT, XGLM, M2M-100 and their relatives write the FFN inside the layer's forward:
`fc2(F.dropout(act(fc1(x)), p=self.activation_dropout, training=self.training))`, in a forward that
takes cache objects and `**kwargs` and so cannot be re-traced on its own. `fc1` and `fc2` are
modules: the MoE stands where `fc1` was and computes the whole FFN, `fc2` (and an activation
module) become identities, and the layer keeps its own class and code. The functional ops between
them then run on the MoE's output, so each must become an identity there, in every mode:

* a dropout with p == 0 already is one;
* a dropout whose p is a float attribute of the module holding the FFN
  (`self.activation_dropout`): that attribute becomes 0.0, and the experts apply the same dropout
  to their hidden activations (`Experts.hidden_dropout`), where the dense FFN applied it;
* an activation function held by an attribute of that module (`self.activation_fn = F.relu`):
  the attribute becomes a `FoldedFunction` identity (the experts apply the activation).

Which attribute feeds which op is found by tracing the FFN's region again with each candidate
attribute replaced (a float equal to p by a distinct sentinel value, a function by a wrapper that
records the nodes it makes), once with the holding modules in eval mode and once in train mode
(the rest of the model in eval mode: no layerdrop). The attribute must feed this op and nothing
else, and a dropout's flag must follow the holder's mode. Where that fails, the FFN is refused
here with the reason, and the caller falls back to re-tracing the holder (`splice`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx, nn

from ..capture.leaves import LeafPolicy
from ..capture.regions import CapturedRegion
from ..capture.tracer import CaptureTracer
from .find_mlps import MLPMatch, buffers_kept
from .splice import DROPOUTS, enclosing_module, training_flag
from .upcycle import FoldedIntoMoE

_SENTINEL_BASE, _SENTINEL_STEP = 0.5, 2.0 ** -24  # exact binary fractions no config holds


@dataclass(frozen=True)
class InlineAttribute:
    """The attribute `name` of the module at `owner` feeds an inline op of an FFN: a dropout's p
    (`kind` "p") or the activation function called (`kind` "function")."""

    owner: str
    name: str
    kind: str


@dataclass
class InlinePlan:
    """What `inline_attributes` found: the attributes to neutralise once the MoE layers stand in
    for the FFNs, and, per FFN index, why one cannot be swapped this way."""

    attributes: dict[InlineAttribute, str]  # attribute -> path of the MoE that takes its op over
    refused: dict[int, str]


class FoldedFunction(FoldedIntoMoE):
    """Stands where a layer held its FFN's activation function; the MoE at `moe_path` applies it.
    Returns its first argument, whatever else the layer's call passes."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x


def is_inline_op(node: fx.Node, activation_nodes: Sequence[fx.Node]) -> bool:
    """A functional dropout of one tensor, or the FFN's activation as one function call of one
    tensor: the functional ops a module swap can make into identities."""
    if node.op != "call_function" or not node.args or node.all_input_nodes != [node.args[0]]:
        return False
    return node.target in DROPOUTS or list(activation_nodes) == [node]


def is_dropout(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in DROPOUTS


def dropout_p(node: fx.Node) -> float:
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    return float(p) if isinstance(p, (int, float)) else float("nan")


def inline_attributes(model: nn.Module, plans: Sequence[tuple[MLPMatch, str, Sequence[fx.Node]]]) -> InlinePlan:
    """For each (FFN, path its MoE will take, functional ops between its modules): the
    attributes that make those ops identities, or why there are none. `model` is the model
    about to be rewritten; its attributes, modes and buffers are as they were when this returns."""
    by_region: dict[int, list[tuple[MLPMatch, str, fx.Node]]] = defaultdict(list)
    for match, host, nodes in plans:
        for node in nodes:
            if not (is_dropout(node) and dropout_p(node) == 0.0):
                by_region[id(match.site.region)].append((match, host, node))
    plan, found = InlinePlan({}, {}), []
    for items in by_region.values():
        found += _probe_region(model, items, plan.refused)
    plan.attributes = {attribute: host for index, attribute, host in found if index not in plan.refused}
    return plan


def neutralize(model: nn.Module, attributes: dict[InlineAttribute, str]) -> None:
    """Make each attribute's op an identity: a dropout's p becomes 0.0 (the experts drop their
    hidden activations instead), an activation function a `FoldedFunction`."""
    for attribute, moe_path in attributes.items():
        owner = model.get_submodule(attribute.owner)
        if attribute.kind == "p":
            setattr(owner, attribute.name, 0.0)
        else:
            function = getattr(owner, attribute.name)
            name = getattr(function, "__qualname__", type(function).__name__)
            setattr(owner, attribute.name, FoldedFunction(moe_path, name).train(owner.training))


def _owners(match: MLPMatch) -> list[str]:
    """The modules whose attributes may feed the ops: the module that holds the FFN (the innermost
    one called once that creates all of it) and those between it and the projections (never its
    ancestors: an encoder's layerdrop must not change while probing)."""
    holder = enclosing_module(match)
    rest = match.path.removeprefix(holder).strip(".") if match.path.startswith(holder) else ""
    paths, parts = [holder], rest.split(".") if rest else []
    for i in range(len(parts)):
        paths.append(".".join(p for p in (holder, *parts[: i + 1]) if p))
    return paths


def _describe(match: MLPMatch, node: fx.Node) -> str:
    what = (f"the functional dropout {node.name} (p={dropout_p(node)})" if is_dropout(node)
            else f"the activation function {node.name} ({getattr(node.target, '__name__', node.target)})")
    return f"{what} between {match.paths[0]} and {match.paths[-1]}"


def _candidates(model: nn.Module, match: MLPMatch, node: fx.Node) -> list[tuple[str, str]]:
    found = []
    for owner in _owners(match):
        for name, value in vars(model.get_submodule(owner)).items():
            if is_dropout(node) and type(value) is float and value == dropout_p(node):
                found.append((owner, name))
            elif not is_dropout(node) and value is node.target:
                found.append((owner, name))
    return found


class _Recorder:
    """Calls `function` and records the graph nodes the calls make (the uses of one attribute)."""

    def __init__(self, function: Callable) -> None:
        self.function, self.nodes = function, []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.function(*args, **kwargs)
        if isinstance(result, fx.Proxy):
            self.nodes.append(result.node)
        return result


def _probe_region(model: nn.Module, items: list[tuple[MLPMatch, str, fx.Node]],
                  refused: dict[int, str]) -> list[tuple[int, InlineAttribute, str]]:
    """(FFN index, attribute, MoE path) for each op of `items` (all in one region) whose attribute
    was found; the others' reasons go to `refused`."""
    region = items[0][0].site.region
    for match, _, node in items:  # no attribute to probe: refused without tracing
        if not _candidates(model, match, node):
            refused.setdefault(match.index, f"{_describe(match, node)} would run on the MoE's output, and "
                               + _no_attribute(match, node))
    items = [item for item in items if item[0].index not in refused]
    if not items:
        return []
    replacements: dict[tuple[str, str], Any] = {}
    for match, _, node in items:
        for key in _candidates(model, match, node):
            if key not in replacements:
                if is_dropout(node):
                    replacements[key] = _SENTINEL_BASE + (len(replacements) + 1) * _SENTINEL_STEP
                else:
                    replacements[key] = _Recorder(getattr(model.get_submodule(key[0]), key[1]))
    graphs, recorded = {}, defaultdict(set)
    failure = None
    try:
        with _replaced(model, replacements), buffers_kept(model):
            for mode in (False, True) if any(is_dropout(node) for *_, node in items) else (False,):
                with _holders_in_mode(model, {enclosing_module(m) for m, _, _ in items}, mode):
                    for value in replacements.values():
                        if isinstance(value, _Recorder):
                            value.nodes = []
                    graphs[mode] = _trace_again(model, region)
                    for key, value in replacements.items():
                        if isinstance(value, _Recorder):
                            recorded[key] |= set(value.nodes)
    except Exception as error:  # noqa: BLE001 - the reason the swap is refused
        failure = f"tracing its region {region.prefix or '<model>'} again failed ({type(error).__name__}: {error})"
    located = []
    for match, host, node in items:
        if failure is None:
            before = _ops_between(region.graph, match)
            probes = {mode: _ops_between(graph, match) for mode, graph in graphs.items()}
            if node in before and all(len(p) == len(before) for p in probes.values()):
                located.append((match, host, node, {m: p[before.index(node)] for m, p in probes.items()}))
                continue
        refused.setdefault(match.index, f"{_describe(match, node)}: "
                                + (failure or "tracing its region again does not give the same FFN"))
    allowed = {probe for *_, probes in located for probe in probes.values()}
    found = []
    for match, host, node, probes in located:
        try:
            found.append((match.index, _attribute_of(match, node, probes, graphs, replacements, recorded, allowed),
                          host))
        except _Refusal as refusal:
            refused.setdefault(match.index, f"{_describe(match, node)} would run on the MoE's output, and {refusal}")
    return found


def _no_attribute(match: MLPMatch, node: fx.Node) -> str:
    holder = _owners(match)[0] or "<model>"
    if is_dropout(node):
        return f"its p is not a float attribute of {holder} that could be set to 0 (a literal, or read from a config?)"
    return f"it is not called through an attribute of {holder} (a global function?) that could become an identity"


class _Refusal(Exception):
    """Why an inline op cannot be made an identity (completes "... would run on the MoE's output, and")."""


def _attribute_of(match: MLPMatch, node: fx.Node, probes: dict[bool, fx.Node], graphs: dict[bool, fx.Graph],
                  replacements: dict[tuple[str, str], Any], recorded: dict[tuple[str, str], set],
                  allowed: set[fx.Node]) -> InlineAttribute:
    holder = _owners(match)[0] or "<model>"
    if not is_dropout(node):
        keys = [k for k, nodes in recorded.items() if set(probes.values()) <= nodes]
        if not keys:
            raise _Refusal(_no_attribute(match, node))
        key = keys[0]
        others = recorded[key] - allowed
        if others:
            raise _Refusal(f"{key[0]}.{key[1]} is also called by {sorted(n.name for n in others)[0]}, so it "
                           "cannot be replaced by an identity")
        return InlineAttribute(key[0], key[1], "function")
    p = dropout_p(probes[False])
    keys = [k for k, v in replacements.items() if v == p and not isinstance(v, _Recorder)]
    if not keys or dropout_p(probes[True]) != p:
        raise _Refusal(_no_attribute(match, node))
    key = keys[0]
    for mode, probe in probes.items():
        if training_flag(probe) is not mode:
            raise _Refusal(f"its training flag is {training_flag(probe)!r} when {holder} is in "
                           f"{'train' if mode else 'eval'} mode, while the experts' dropout follows the mode")
    for graph in graphs.values():
        for other in graph.nodes:
            if other not in allowed and _mentions(other, p):
                raise _Refusal(f"its p is {key[0]}.{key[1]}, which {other.name} also reads, so it cannot be "
                               "set to 0")
    return InlineAttribute(key[0], key[1], "p")


def _mentions(node: fx.Node, value: float) -> bool:
    seen: list[bool] = []
    fx.node.map_aggregate((node.args, node.kwargs), lambda a: seen.append(type(a) is float and a == value) or a)
    return any(seen)


def _ops_between(graph: fx.Graph, match: MLPMatch) -> list[fx.Node]:
    """The functional ops on the chain that ends at the FFN's down projection, back to the last
    projection before it, in execution order (found by module target, not node name)."""
    down, ups = match.site.down.node.target, {p.node.target for p in match.site.projections[:-1]}
    ends = [n for n in graph.nodes if n.op == "call_module" and n.target == down]
    if len(ends) != 1:
        return []
    chain, node = [], ends[0]
    while node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
        if node.op == "call_module" and node.target in ups:
            return chain[::-1]
        if node.op == "call_function":
            chain.append(node)
    return []


@contextlib.contextmanager
def _replaced(model: nn.Module, replacements: dict[tuple[str, str], Any]) -> Iterator[None]:
    saved = [(owner, name, getattr(model.get_submodule(owner), name)) for owner, name in replacements]
    try:
        for (owner, name), value in replacements.items():
            setattr(model.get_submodule(owner), name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(model.get_submodule(owner), name, value)


@contextlib.contextmanager
def _holders_in_mode(model: nn.Module, holders: set[str], mode: bool) -> Iterator[None]:
    """The whole model in eval mode (no layerdrop, no random skips while tracing) except the
    modules that hold the FFNs, whose own flag is `mode`."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for path in holders:
            model.get_submodule(path).training = mode
        yield
    finally:
        for module, flag in saved:
            module.training = flag


def _trace_again(model: nn.Module, region: CapturedRegion) -> fx.Graph:
    """The region traced as capture traced it, but through `model`'s modules (the copy being
    rewritten, not the model the region was captured from). Every module the capture kept as a
    leaf stays one (the user's `leaf_modules=` included)."""
    target = model.get_submodule(region.prefix)
    policy = LeafPolicy(leaf_names=tuple({n.target for n in region.graph.nodes if n.op == "call_module"}))
    if region.inner:
        root = copy.copy(region.root)
        root._modules = {**region.root._modules, region.inner: target}
        tracer = CaptureTracer(policy, shadow_inputs=region.root.example_tensors)
    else:
        root, tracer = target, CaptureTracer(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tracer.trace(root)
