"""Declarative FFN patterns: a small labelled graph matched with networkx, plus checks.

A pattern names roles (`up`, `act`, `down`, ...) with the label each must carry and the edges
between them. `FFNPattern.find` runs networkx subgraph matching over a `PatternView`;
`FFNPattern.check` turns a candidate into an `FFNSite` or a `MatchResult` that says why not
(like onnxscript's rewriter). Adding an FFN family means adding one pattern file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import networkx as nx
from networkx.algorithms import isomorphism
from torch import fx

from ..capture.leaves import is_projection_module
from ..capture.regions import CapturedRegion
from .plain import global_hooks_problem, module_problem, projection_problem
from .view import PatternView
from .vocabulary import Part, Projection, is_ffn_activation

ANY = "*"


@dataclass
class FFNSite:
    """One FFN found in a captured region: everything the rewrite needs."""

    kind: str
    activation: str
    up: Projection                  # dense: up; gated: up; fused_gated: the fused projection
    down: Projection
    gate: Projection | None         # gated: the separate gate projection
    gate_half: int | None           # fused_gated: which half of `up`'s output is the gate
    x: fx.Node                      # the FFN input
    y: fx.Node                      # the FFN output (the down projection)
    members: set[fx.Node]           # every node of the FFN, y included, x excluded
    activation_nodes: list[fx.Node]
    region: CapturedRegion
    hidden_dropout: float = 0.0     # set by FFNPattern.check

    @property
    def d_model(self) -> int:
        return self.down.out_features

    @property
    def d_ff(self) -> int:
        return self.down.in_features

    @property
    def projections(self) -> list[Projection]:
        return [p for p in (self.gate, self.up, self.down) if p is not None]

    @property
    def order(self) -> int:
        return self.y.meta["order"]


@dataclass
class MatchResult:
    """Outcome of checking one candidate: a site, or the reason it is not an FFN."""

    site: FFNSite | None = None
    reason: str = ""
    nodes: list[str] = field(default_factory=list)

    @classmethod
    def fail(cls, reason: str, *nodes: fx.Node) -> "MatchResult":
        return cls(None, reason, [n.name for n in nodes])

    def __bool__(self) -> bool:
        return self.site is not None


class FFNPattern:
    """Base class: subclasses declare `kind`, `roles`, `edges` and implement `assemble`."""

    kind: ClassVar[str]
    roles: ClassVar[dict[str, str]]              # role -> view label (ANY matches all)
    edges: ClassVar[tuple[tuple[str, str], ...]]
    before_activation: ClassVar[tuple[tuple[str, str], ...]] = ()   # edges where dropout is wrong
    after_activation: ClassVar[tuple[tuple[str, str], ...]] = ()    # edges whose dropout is kept

    def pattern_graph(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        for role, label in self.roles.items():
            graph.add_node(role, label=label)
        graph.add_edges_from(self.edges)
        return graph

    def find(self, view: PatternView) -> Iterator[dict[str, fx.Node]]:
        """Every placement of the pattern in the view, as role -> view node (tail FX node)."""
        matcher = isomorphism.DiGraphMatcher(
            view.graph, self.pattern_graph(),
            node_match=lambda g, p: p["label"] == ANY or g["label"] == p["label"],
        )
        seen: set[frozenset] = set()
        for mapping in matcher.subgraph_monomorphisms_iter():
            roles = {role: node for node, role in mapping.items()}
            key = frozenset((r, n) for r, n in roles.items())
            if key not in seen:
                seen.add(key)
                yield roles

    def assemble(self, view: PatternView, roles: dict[str, fx.Node]) -> MatchResult:
        raise NotImplementedError

    # --- shared checks ----------------------------------------------------------------
    def check(self, view: PatternView, roles: dict[str, fx.Node]) -> MatchResult:
        result = self.assemble(view, roles)
        if not result:
            return result
        site = result.site
        for check in (_check_activation, _check_leaks, _check_single_calls, _check_plain_modules):
            failure = check(site)
            if failure is not None:
                return failure
        dropout = self._hidden_dropout(view, roles)
        if isinstance(dropout, MatchResult):
            return dropout
        site.hidden_dropout = dropout
        return result

    def collect_members(self, view: PatternView, roles: dict[str, fx.Node]) -> set[fx.Node]:
        members: set[fx.Node] = set()
        for role, node in roles.items():
            if self.roles[role] != ANY:
                members.update(view.nodes[node].members)
        for a, b in self.edges:
            if self.roles[a] != ANY:
                members.update(view.graph.edges[roles[a], roles[b]]["via"])
        for node in list(members):  # parameters read by functional projections
            if view.meaning[node].projection is not None and view.meaning[node].projection.style == "functional":
                members.update(n for n in node.all_input_nodes if n.op == "get_attr")
        return members

    def _hidden_dropout(self, view: PatternView, roles: dict[str, fx.Node]) -> MatchResult | float:
        """The dropout probability between activation and down projection (dropouts in series
        combine: keep = Π(1 - p)), or a failure for dropout before the activation."""
        keep = 1.0
        for edges, allowed in ((self.before_activation, False), (self.after_activation, True)):
            for a, b in edges:
                for node in view.graph.edges[roles[a], roles[b]]["via"]:
                    p = view.meaning[node].dropout or 0.0
                    if p and not allowed:
                        return MatchResult.fail(f"dropout (p={p}) sits before the activation, "
                                                "which an expert cannot reproduce", node)
                    keep *= 1.0 - p
        return 1.0 - keep


def projection(view: PatternView, node: fx.Node) -> Projection:
    return view.meaning[node].projection


def part_of(view: PatternView, node: fx.Node) -> Part:
    return view.meaning[node].part


def _check_activation(site: FFNSite) -> MatchResult | None:
    if not is_ffn_activation(site.activation):
        return MatchResult.fail(
            f"activation {site.activation!r} is not an FFN activation (a pooler or head?); "
            "if it is one, name it with upcycle_fx.register_activation", *site.activation_nodes)
    return None


def _check_leaks(site: FFNSite) -> MatchResult | None:
    for node in site.members:
        if node is site.y:
            continue
        outside = [u for u in node.users if u not in site.members]
        if outside:
            return MatchResult.fail(f"intermediate value {node.name} is also used outside the FFN "
                                    f"(by {outside[0].name})", node)
    return None


def _check_single_calls(site: FFNSite) -> MatchResult | None:
    for proj in site.projections:
        calls = site.region.call_counts.get(proj.owner, 1) if proj.style != "functional" else 1
        if calls != 1:
            return MatchResult.fail(f"{proj.owner} is called {calls} times (shared weights); "
                                    "its copies cannot become independent experts", proj.node)
    return None


def _check_plain_modules(site: FFNSite) -> MatchResult | None:
    """Every module of the FFN does exactly what the MoE will copy (see `plain.py`)."""
    problem = global_hooks_problem()
    if problem is not None:
        return MatchResult.fail(problem, site.y)
    region = site.region
    for node in sorted(site.members, key=lambda n: n.meta["order"]):
        if node.op != "call_module":
            continue
        module, path = region.module(node.target), region.absolute(node.target)
        if is_projection_module(module):
            problem = projection_problem(module, path)
        else:
            problem = module_problem(module, path)
        if problem is not None:
            return MatchResult.fail(problem, node)
    return None
