"""Graph splice: the rewrite for FFNs that no module holds on its own.

An FFN written inline with functional ops, `x + self.down(F.gelu(self.up(self.norm(x))))`,
has no module to swap. Its enclosing module is then re-traced on its own, the FFN's nodes
become one call to the MoE, and the module keeps its identity: its class becomes a subclass of
its own class (same name, `isinstance` still holds) whose `forward` runs the new graph. So its
other methods, attributes, hooks, submodules and every reference to it stay as they were (a
GraphModule would hold only what the traced forward used). The FFN's modules that nothing else
uses become `FoldedIntoMoE` identities and its raw weights are deleted, so the dense FFN is not
kept twice. Two things must not be frozen by the trace: functional dropout's `training` flag
(the module is traced in train and in eval mode; a flag that differs becomes an `nn.Dropout`
module, a constant stays a constant), and any other behaviour that depends on the mode (the two
traces must otherwise be identical).
"""

from __future__ import annotations

import itertools
import linecache
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..capture._fx_private import module_hooks
from ..capture.leaves import LeafPolicy
from ..capture.regions import trace_region
from ..errors import RewriteError
from ..moe import MoE
from .find_mlps import MLPMatch, match_region

DROPOUTS = (F.dropout, torch.dropout)  # the functional dropouts


@dataclass(frozen=True)
class SplicePlan:
    """Replace the module at `path` by a re-traced graph holding `matches` as MoE calls
    (`swap_refused`: why a module swap could not stand in for them, for the error message)."""

    path: str
    matches: tuple[MLPMatch, ...]
    swap_refused: tuple[str, ...] = ()


def enclosing_module(match: MLPMatch) -> str:
    """The innermost module, called once (once per call of a weight-shared FFN), whose call
    creates every node of the FFN."""
    site, region = match.site, match.site.region
    calls = [[n for n in call.members if n.op != "get_attr"] for call in site.every_call]
    best: tuple[int, str] | None = None
    for span in region.spans:
        path = region.absolute(span.path)
        if (region.call_counts[path] == len(calls) and all(span.created(n) for n in calls[0])
                and all(_created_in_a_call(region, path, call) for call in calls[1:])):
            size = span.end - span.first
            if best is None or size < best[0]:
                best = (size, path)
    if best is None:
        once = "once" if len(calls) == 1 else f"once per call of this weight-shared FFN ({len(calls)} times)"
        raise RewriteError(f"FFN #{match.index} ({', '.join(match.paths)}) is not inside any module "
                           f"called exactly {once}; it cannot be rewritten")
    return best[1]


def _created_in_a_call(region, path: str, nodes: list[fx.Node]) -> bool:
    return any(region.absolute(s.path) == path and all(s.created(n) for n in nodes) for s in region.spans)


def check_spliceable(model: nn.Module, path: str) -> None:
    """RewriteError if re-tracing the module at `path` would freeze a hook: the trace runs
    through its non-leaf submodules, so their hooks would run once, at capture, and never again
    (hooks on the module itself and on leaves stay, since those are still called)."""
    block, policy = model.get_submodule(path), LeafPolicy()
    for name, module in block.named_modules():
        kinds = module_hooks(module)
        if name and kinds and not policy.is_leaf(module, name):
            where = ".".join(p for p in (path, name) if p)
            raise RewriteError(
                f"{where}: the FFN inside {path or '<model>'} is written inline, so that module is "
                f"re-traced, and the {kinds[0]} on {where} would run only once, while tracing. Remove "
                "it before the rewrite (and register it again afterwards), or move the FFN into its "
                "own nn.Module.")


def training_flag(node: fx.Node) -> object:
    """The `training` / `train` argument of a functional dropout node, as recorded."""
    if node.target is F.dropout:
        return node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return node.kwargs.get("train", node.args[2] if len(node.args) > 2 else None)


def _signature(graph: fx.Graph) -> list[tuple]:
    """The graph with dropout's training flags left out (to compare train and eval traces)."""
    rows = []
    for node in graph.nodes:
        args, kwargs = node.args, dict(node.kwargs)
        if node.target in DROPOUTS:
            kwargs.pop("training", None)
            kwargs.pop("train", None)
            args = args[:2]
        rows.append((node.op, str(node.target), node.name, repr(args), repr(kwargs)))
    return rows


def _trace_both_modes(module: nn.Module, path: str, swap_refused: tuple[str, ...] = ()):
    mode = module.training
    try:
        regions = {flag: trace_region(module.train(flag), path, None) for flag in (True, False)}
    except Exception as error:  # noqa: BLE001
        swap = f"; and a module swap cannot stand in for it: {swap_refused[0]}" if swap_refused else ""
        raise RewriteError(f"{path}: the FFN inside is written inline, and the module that holds it "
                           f"cannot be traced on its own ({type(error).__name__}: {error}){swap}; move "
                           "the FFN into its own nn.Module, or leave it dense (pattern=[...])") from error
    finally:
        module.train(mode)
    if _signature(regions[True].graph) != _signature(regions[False].graph):
        raise RewriteError(f"{path}: its forward depends on self.training beyond dropout, which a "
                           "traced graph cannot keep; move the FFN into its own nn.Module")
    return regions[True], regions[False]


def splice(model: nn.Module, plan: SplicePlan, moes: list[MoE]) -> nn.Module:
    """Make the module at `plan.path` in `model` run its re-traced graph with the FFNs as MoE
    calls (in place: the module object stays, its class becomes a `SplicedModule` subclass)."""
    module = model.get_submodule(plan.path)
    region, eval_region = _trace_both_modes(module, plan.path, plan.swap_refused)
    graph = region.graph
    sites = {tuple(p.owner for p in s.projections): s for s in match_region(region)[0]}
    removed: dict[str, str] = {}  # graph target the FFN used -> name of the MoE that replaces it
    for index, (match, moe) in enumerate(zip(plan.matches, moes)):
        site = sites.get(match.paths)
        if site is None:
            raise RewriteError(f"{plan.path}: FFN #{match.index} was not found again when the module "
                               "was traced on its own")
        name = _free_name(module, f"moe_{index}")
        module.add_module(name, moe.train(module.training))
        with graph.inserting_before(site.y):
            call = graph.call_module(name, (site.x,))
        site.y.replace_all_uses_with(call)
        for node in sorted(site.members, key=lambda n: n.meta["order"], reverse=True):
            if node.op in ("call_module", "get_attr"):
                removed.setdefault(node.target, name)
            if not node.users:
                graph.erase_node(node)
    _dropouts_follow_mode(module, graph, eval_region.graph)
    graph.lint()
    _drop_dense_parts(module, graph, removed, plan.path)
    module.__class__ = spliced_class(type(module), graph)
    return model


class SplicedModule:
    """Mixed into the class of every spliced module: `forward` runs `spliced_graph`.

    Pickling and deep copies rebuild the class from (original class, graph), since the class
    itself is made at run time and cannot be found by name.
    """

    spliced_graph: fx.Graph
    spliced_code: str
    _spliced_base: type

    def __reduce_ex__(self, protocol):
        return _rebuild_spliced, (self._spliced_base, self.spliced_graph), self.__dict__


def is_spliced(module: nn.Module) -> bool:
    """Whether `module` runs a re-traced graph holding MoE calls (see `splice`)."""
    return isinstance(module, SplicedModule)


_counter = itertools.count()


def spliced_class(base: type, graph: fx.Graph) -> type:
    """A subclass of `base`, named like it, whose `forward` is the Python code of `graph`."""
    base = base._spliced_base if issubclass(base, SplicedModule) else base
    code = graph.python_code(root_module="self")
    filename = f"<upcycle_fx spliced {base.__qualname__} #{next(_counter)}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - code generated by torch.fx
    attributes = {"forward": namespace["forward"], "spliced_graph": graph, "spliced_code": code.src,
                  "_spliced_base": base, "__module__": base.__module__, "__qualname__": base.__qualname__,
                  "__doc__": base.__doc__}
    return type(base.__name__, (SplicedModule, base), attributes)


def _rebuild_spliced(base: type, graph: fx.Graph) -> nn.Module:
    cls = spliced_class(base, graph)
    return cls.__new__(cls)


def _drop_dense_parts(module: nn.Module, graph: fx.Graph, removed: dict[str, str], path: str) -> None:
    """The FFN's submodules that the graph no longer calls become `FoldedIntoMoE`; its raw
    weights (read by `F.linear`) that it no longer reads are deleted."""
    from .upcycle import FoldedIntoMoE, set_submodule

    used = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
    for target, moe_name in removed.items():
        if target in used or any(u.startswith(target + ".") for u in used):
            continue
        owner_path, _, name = target.rpartition(".")
        owner = module.get_submodule(owner_path)
        children = dict(owner.named_children())
        tensors = {**dict(owner.named_parameters(recurse=False)), **dict(owner.named_buffers(recurse=False))}
        if name in children:
            replaced = children[name]
            moe_path = ".".join(p for p in (path, moe_name) if p)
            folded = FoldedIntoMoE(moe_path, type(replaced).__name__).train(replaced.training)
            set_submodule(module, target, folded)
        elif name in tensors:
            delattr(owner, name)


def _dropouts_follow_mode(module: nn.Module, graph: fx.Graph, eval_graph: fx.Graph) -> None:
    """Functional dropouts whose flag was `self.training` become nn.Dropout modules."""
    eval_flags = {n.name: training_flag(n) for n in eval_graph.nodes if n.target in DROPOUTS}
    for node in list(graph.nodes):
        if node.target not in DROPOUTS or eval_flags.get(node.name) == training_flag(node):
            continue
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        name = _free_name(module, "dropout")
        module.add_module(name, nn.Dropout(float(p)).train(module.training))
        with graph.inserting_before(node):
            replacement = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)


def _free_name(module: nn.Module, base: str) -> str:
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return name
