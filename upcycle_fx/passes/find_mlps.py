"""Analysis pass: every FFN in the captured graphs, in execution order (nothing is changed)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx, nn

from ..capture import Capture, CapturedRegion, LeafPolicy, capture
from ..patterns import PATTERNS, FFNSite, build_view
from .blocks import block_position, common_path


@dataclass(frozen=True)
class MLPMatch:
    """One FFN found in the model (what `upcycle_fx.find_mlps` reports).

    kind: "dense" | "gated" | "fused_gated"; activation: e.g. "gelu_tanh", "silu", "relu2";
    paths: modules owning the projections (gate, up, down order; one fused [gate|up] path for
    fused_gated); style: "linear" | "conv1d" | "functional"; stack/block: the repeated-block
    container (e.g. "model.layers") and the block's index in it, or None outside any stack.
    """

    index: int
    kind: str
    activation: str
    d_model: int
    d_ff: int
    paths: tuple[str, ...]
    style: str
    bias: bool
    stack: str | None
    block: int | None
    site: FFNSite = field(repr=False, compare=False)
    outside_uses: tuple["OutsideUse", ...] = field(default=(), compare=False)  # its weights used elsewhere

    @property
    def path(self) -> str:
        """The deepest module that holds the whole FFN."""
        return common_path(self.paths)

    @property
    def num_parameters(self) -> int:
        return sum(p.in_features * p.out_features + (p.out_features if p.bias else 0)
                   for p in self.site.projections)

    def describe(self) -> str:
        where = f"{self.stack}[{self.block}]" if self.stack is not None else self.path or "<model>"
        return (f"#{self.index} {where}: {self.kind} {self.activation} d_model={self.d_model} "
                f"d_ff={self.d_ff} ({', '.join(self.paths)})")


@dataclass(frozen=True)
class OutsideUse:
    """A use of an FFN's weight other than by the FFN: a graph node reading it, or another name
    the same parameter is registered under (node None)."""

    what: str
    node: fx.Node | None = None

    def __str__(self) -> str:
        return self.what


@dataclass(frozen=True)
class NearMiss:
    """A candidate a pattern matched structurally but rejected, with the reason.

    paths: the modules owning its projections (the candidate's place in the model);
    activation: what sat between them ("" when the pattern failed before naming it)."""

    pattern: str
    region: str
    reason: str
    nodes: tuple[str, ...]
    paths: tuple[str, ...] = ()
    activation: str = ""

    @property
    def where(self) -> str:
        return ", ".join(self.paths) or self.region or "<model>"


class MLPList(list):
    """`find_mlps` result: a list of MLPMatch, plus the diagnostics of the search.

    `decisions` (filled by `upcycle_fx.find_mlps`): one `Decision` per candidate, found FFNs in
    execution order then near misses; `explain()` prints them as a table."""

    def __init__(self, matches=(), near_misses=(), capture_failures=(), capture_result=None):
        super().__init__(matches)
        self.near_misses: list[NearMiss] = list(near_misses)
        self.capture_failures: list[tuple[str, str]] = list(capture_failures)
        self.capture: Capture | None = capture_result
        self.decisions: list = []

    def explain(self) -> str:
        """One line per candidate: selected, not selected or rejected, and why."""
        from .decisions import explain

        return explain(self)


def find_mlps(model: nn.Module, example_inputs: Any = None,
              leaf_policy: LeafPolicy | None = None) -> MLPList:
    """Capture `model` and run every registered pattern over each captured region."""
    sites: list[FFNSite] = []
    near: list[NearMiss] = []
    with buffers_kept(model):
        captured = capture(model, example_inputs, leaf_policy)
        for region in captured.regions:
            found, missed = match_region(region)
            sites += found
            near += missed
    region_rank = {id(r): i for i, r in enumerate(captured.regions)}
    sites.sort(key=lambda s: (region_rank[id(s.region)], s.order))
    matches = [_describe(model, i, site, captured.regions) for i, site in enumerate(sites)]
    return MLPList(matches, near, captured.failures, captured)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Leave every buffer as it was: capture runs the model (example forward, shadow values), and
    in training mode that updates BatchNorm statistics and spectral-norm power iterations."""
    saved = [(module, name, buffer, buffer.detach().clone())
             for module in model.modules() for name, buffer in module.named_buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, value in saved:
                setattr(module, name, buffer)
                if buffer.device.type != "meta" and not torch.equal(buffer, value):
                    buffer.copy_(value)


def match_region(region: CapturedRegion) -> tuple[list[FFNSite], list[NearMiss]]:
    """Run every registered pattern over one captured region; overlapping matches lose."""
    view = build_view(region)
    sites: list[FFNSite] = []
    near: dict[tuple, tuple[NearMiss, set]] = {}
    taken: set = set()
    for pattern in PATTERNS:
        for roles in pattern.find(view):
            result = pattern.check(view, roles)
            if not result:
                miss, projections = _near_miss(pattern.kind, view, roles, result)
                near.setdefault((miss.paths, miss.reason), (miss, projections))
            elif not result.site.members & taken:
                taken |= result.site.members
                sites.append(result.site)
    # a rejected placement that shares a projection with a found FFN is part of that FFN
    return sites, [miss for miss, projections in near.values() if not projections & taken]


def _near_miss(kind: str, view, roles: dict[str, fx.Node], result) -> tuple[NearMiss, set[fx.Node]]:
    """The NearMiss of a rejected placement, and its projection nodes."""
    projections = {node: view.meaning[node].projection for node in roles.values()
                   if view.meaning[node].projection is not None}
    ordered = sorted(projections, key=lambda n: n.meta.get("order", 0))
    paths = tuple(dict.fromkeys(projections[n].owner for n in ordered))
    act = view.nodes[roles["act"]].activation if "act" in roles and roles["act"] in view.nodes else None
    return (NearMiss(kind, view.region.prefix, result.reason, tuple(result.nodes), paths, act or ""),
            set(projections))


def _describe(model: nn.Module, index: int, site: FFNSite, regions: list[CapturedRegion]) -> MLPMatch:
    paths = tuple(p.owner for p in site.projections)
    stack, block = block_position(model, paths)
    return MLPMatch(
        index=index, kind=site.kind, activation=site.activation, d_model=site.d_model,
        d_ff=site.d_ff, paths=paths, style=site.down.style,
        bias=any(p.bias is not None for p in site.projections), stack=stack, block=block, site=site,
        outside_uses=outside_uses(model, site, regions))


def outside_uses(model: nn.Module, site: FFNSite, regions: list[CapturedRegion]) -> tuple[OutsideUse, ...]:
    """Where the FFN's weights are used other than by the FFN: read in a captured graph outside
    the match (a tie written in code, `x @ self.mlp.fc1.weight.T`; reads nothing consumes do not
    count), or registered under another name (a tied parameter). The rewrite removes the dense
    weights, so such uses would break (unless they sit inside the module the MoE replaces)."""
    tensors = {f"{p.owner}.{name}": getattr(model.get_submodule(p.owner), name)
               for p in site.projections for name in (p.weight, p.bias) if name is not None}
    uses = []
    for region in regions:
        for node in region.graph.nodes:
            if (node.op == "get_attr" and node.users and node not in site.members
                    and region.absolute(node.target) in tensors):
                users = ", ".join(u.name for u in node.users)
                uses.append(OutsideUse(f"{region.absolute(node.target)} is read outside the FFN (by {users})", node))
    ids = {id(t): path for path, t in tensors.items()}
    for path, param in model.named_parameters(remove_duplicate=False):
        same_module = model.get_submodule(path.rpartition(".")[0]) is _owner(model, ids.get(id(param)))
        if id(param) in ids and path not in tensors and not same_module:  # a shared module is swapped whole
            uses.append(OutsideUse(f"{ids[id(param)]} is the same parameter as {path}"))
    return tuple(uses)


def _owner(model: nn.Module, path: str | None) -> nn.Module | None:
    return None if path is None else model.get_submodule(path.rpartition(".")[0])
