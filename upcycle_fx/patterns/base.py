"""Declarative FFN patterns: a small labelled graph matched with networkx, plus checks.

A pattern names roles (`up`, `act`, `down`, ...) with the label each must carry and the edges
between them. `FFNPattern.find` runs networkx subgraph matching over a `PatternView`;
`FFNPattern.check` turns a candidate into an `FFNSite` or a `MatchResult` that says why not
(like onnxscript's rewriter). Adding an FFN family means adding one pattern file.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import ClassVar, Iterator

import networkx as nx
from networkx.algorithms import isomorphism
from torch import fx, nn

from ..capture.leaves import is_projection_module
from ..capture.regions import CapturedRegion
from ..moe.experts import FFNWeights
from .plain import global_hooks_problem, module_problem, projection_problem
from .view import PatternView
from .vocabulary import NodeMeaning, Part, Projection, is_ffn_activation

ANY = "*"


@dataclass
class FFNSite:
    """One FFN found in a captured region: everything the rewrite needs.

    `pattern` is the family that matched it: it knows how the projections' weights become the
    experts' stacked weights (`dense_weights`). A weight-shared FFN (one module run by several
    blocks, or on several streams) is one site: the first call, with the others in `calls`.
    """

    pattern: "FFNPattern"
    activation: str
    up: Projection                  # the (first) projection reading x; a fused [gate | up] one
    down: Projection
    x: fx.Node                      # the FFN input
    y: fx.Node                      # the FFN output (the down projection)
    members: set[fx.Node]           # every node of the FFN, y included, x excluded
    activation_nodes: list[fx.Node]
    region: CapturedRegion
    gate: Projection | None = None  # a separate gate projection
    hidden_dropout: float = 0.0     # set by FFNPattern.check
    calls: tuple["FFNSite", ...] = ()  # the further calls of a weight-shared FFN
    channel_dim: int = -1           # the dim of x (and y) that holds d_model

    @property
    def kind(self) -> str:
        return self.pattern.kind

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

    @property
    def every_call(self) -> tuple["FFNSite", ...]:
        return (self, *self.calls)

    def dense_weights(self, model: nn.Module) -> FFNWeights:
        """The FFN's weights read from `model`, as the experts stack them (see FFNWeights)."""
        weights = self.pattern.dense_weights(self, model)
        return dataclasses.replace(weights, **{name: getattr(weights, name).detach() for name in
                                               ("up", "up_bias", "down", "down_bias")
                                               if getattr(weights, name) is not None})


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
    """One FFN family, all of it in one class (one file, registered with `@register_pattern`):

    - `roles` and `edges`: the small labelled graph to find (labels of `vocabulary.py`, or
      labels the family gives nodes itself in `label_node`);
    - `assemble`: one placement of that graph -> an `FFNSite` (via `site`), or why not;
    - `dense_weights`: how the site's projections become the experts' stacked weights.
    Nothing else in upcycle_fx branches on the family.
    """

    kind: ClassVar[str]
    roles: ClassVar[dict[str, str]]              # role -> view label (ANY matches all)
    edges: ClassVar[tuple[tuple[str, str], ...]]
    before_activation: ClassVar[tuple[tuple[str, str], ...]] = ()   # edges where dropout is wrong
    after_activation: ClassVar[tuple[tuple[str, str], ...]] = ()    # edges whose dropout is kept

    def label_node(self, node: fx.Node, region: CapturedRegion) -> NodeMeaning | None:
        """A label for a node the shared vocabulary does not know (e.g. a projection module of
        this family's own kind), or None to leave the node to the vocabulary."""
        return None

    def assemble(self, view: PatternView, roles: dict[str, fx.Node]) -> MatchResult:
        raise NotImplementedError

    def dense_weights(self, site: FFNSite, model: nn.Module) -> FFNWeights:
        """`down(act(up(x)))`: up and down as they are, in the nn.Linear layout."""
        up, up_bias = site.up.tensors(model)
        down, down_bias = site.down.tensors(model)
        return FFNWeights(up, up_bias, down, down_bias, gated=False)

    def site(self, view: PatternView, roles: dict[str, fx.Node], *, up: Projection, down: Projection,
             site_class: type[FFNSite] = FFNSite, **fields) -> MatchResult:
        """The site of one placement whose activation has the role `act`, whose input is `up`'s
        input and whose output is `down`'s (`fields`: other FFNSite fields, or these)."""
        act = view.nodes[roles["act"]]
        fields.setdefault("x", up.node.args[0])
        fields.setdefault("y", down.node)
        return MatchResult(site_class(
            pattern=self, activation=act.activation, up=up, down=down,
            members=self.collect_members(view, roles), activation_nodes=act.members,
            region=view.region, **fields))

    def pattern_graph(self) -> nx.DiGraph:
        graph = nx.DiGraph()
        for role, label in self.roles.items():
            graph.add_node(role, label=label)
        graph.add_edges_from(self.edges)
        return graph

    def find(self, view: PatternView) -> Iterator[dict[str, fx.Node]]:
        """Every placement of the pattern in the view, as role -> view node (tail FX node)
        (found once per view)."""
        if self not in view.placements:
            view.placements[self] = list(self.placements(view))
        return iter(view.placements[self])

    def placements(self, view: PatternView) -> Iterator[dict[str, fx.Node]]:
        """Every placement by networkx subgraph matching (a family may find its own way)."""
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

    # --- shared checks ----------------------------------------------------------------
    def check(self, view: PatternView, roles: dict[str, fx.Node]) -> MatchResult:
        """The site of one placement after every check; for a weight-shared FFN, the site of its
        first call holding all its calls (so each call's placement gives that same site)."""
        result = self._check_call(view, roles)
        if not result or _calls(view, result.site) == 1:
            return result
        return self._shared(view, result.site)

    def _check_call(self, view: PatternView, roles: dict[str, fx.Node]) -> MatchResult:
        key = (self, frozenset(roles.items()))
        if key not in view.checked:
            view.checked[key] = self._check_placement(view, roles)
        return view.checked[key]

    def _check_placement(self, view: PatternView, roles: dict[str, fx.Node]) -> MatchResult:
        result = self.assemble(view, roles)
        if not result:
            return result
        site = result.site
        for check in (_check_activation, _check_leaks, _check_plain_modules):
            failure = check(site)
            if failure is not None:
                return failure
        failure = _check_calls(view, site)
        if failure is not None:
            return failure
        dropout = self._hidden_dropout(view, roles)
        if isinstance(dropout, MatchResult):
            return dropout
        site.hidden_dropout = dropout
        return result

    def _shared(self, view: PatternView, site: FFNSite) -> MatchResult:
        """A weight-shared FFN becomes one MoE shared by its calls, so every call of its
        projections must be this same FFN: same family, same roles, same activation."""
        if self not in view.shared:  # every call of every shared FFN of this family, at once
            calls: dict[tuple, dict[fx.Node, FFNSite]] = {}
            for roles in self.find(view):
                result = self._check_call(view, roles)
                if result and _calls(view, result.site) > 1:
                    calls.setdefault(_weights_key(result.site), {}).setdefault(result.site.y, result.site)
            view.shared[self] = {key: sorted(found.values(), key=lambda s: s.order)
                                 for key, found in calls.items()}
        same = [call for call in view.shared[self][_weights_key(site)]
                if (call.activation, call.hidden_dropout) == (site.activation, site.hidden_dropout)]
        expected = _calls(view, site)
        if len(same) != expected:
            return MatchResult.fail(
                f"{site.up.owner} is called {expected} times (shared weights), but only {len(same)} of "
                f"those calls are this same {self.kind} FFN (same projections, activation and dropout); "
                "one MoE shared by every call cannot replace it", site.up.node)
        first, *others = same
        first.calls = tuple(others)
        return MatchResult(first)

    def collect_members(self, view: PatternView, roles: dict[str, fx.Node]) -> set[fx.Node]:
        members: set[fx.Node] = set()
        for role, node in roles.items():
            if self.roles[role] != ANY:
                members.update(view.nodes[node].members)
        for a, b in self.edges:
            if self.roles[a] != ANY:
                members.update(view.graph.edges[roles[a], roles[b]]["via"])
        for node in list(members):  # parameters read by functional projections
            if view.meaning[node].projection is not None:
                members.update(n for n in node.all_input_nodes if n.op == "get_attr")
        members |= _size_reads(members)
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


def _size_reads(members: set[fx.Node]) -> set[fx.Node]:
    """Nodes that read sizes of FFN values (`.shape`, `.size()`, items of them) only for FFN
    nodes (`b, t, _ = h.shape; h.view(b, t, 2, -1)`): they belong to the FFN."""
    found: set[fx.Node] = set()
    frontier = [u for m in members for u in m.users if u not in members and _reads_size(u, found)]
    while frontier:
        node = frontier.pop()
        if node not in found:
            found.add(node)
            frontier += [u for u in node.users if u not in members and _reads_size(u, found)]
    while True:  # keep only those whose every user is the FFN's
        escaped = {n for n in found if any(u not in members and u not in found for u in n.users)}
        if not escaped:
            return found
        found -= escaped


def _reads_size(node: fx.Node, sizes: set[fx.Node]) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return node.args[1:] == ("shape",)
    if node.op == "call_method" and node.target == "size":
        return True
    return node.op == "call_function" and node.target is operator.getitem and node.args[0] in sizes


def _weights_key(site: FFNSite) -> tuple:
    return tuple((p.owner, p.weight) for p in site.projections)


def _calls(view: PatternView, site: FFNSite) -> int:
    """How many times this region runs the site's first projection."""
    return view.projection_calls[(site.up.owner, site.up.weight)]


def _check_calls(view: PatternView, site: FFNSite) -> MatchResult | None:
    """Every projection of the FFN runs as often as the others, and only in this region: once,
    or once per call of a weight-shared FFN (which becomes one MoE shared by its calls). A
    projection run more often, or also elsewhere, is shared with something else."""
    here = {p.owner: view.projection_calls[(p.owner, p.weight)] for p in site.projections}
    for proj in site.projections:
        module = proj.node.op == "call_module"  # a functional projection: its nodes are its calls
        calls = view.region.call_counts.get(proj.owner, 1) if module else here[proj.owner]
        if calls != here[proj.owner]:
            return MatchResult.fail(f"{proj.owner} is called {calls} times (shared weights), "
                                    f"{here[proj.owner]} of them in this captured region; its copies "
                                    "cannot become independent experts", proj.node)
    if len(set(here.values())) != 1:
        owner, calls = max(here.items(), key=lambda item: item[1])
        proj = next(p for p in site.projections if p.owner == owner)
        return MatchResult.fail(f"{owner} is called {calls} times (shared weights), the rest of the "
                                f"FFN {min(here.values())} times; its copies cannot become "
                                "independent experts", proj.node)
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
