"""The pattern view of a captured graph: a networkx DiGraph of meaningful nodes.

Pass-through nodes (dropout, identity, the split op before its getitems) are contracted into
the edges that cross them (edge attribute `via`), and chains of elementwise ops
(`relu -> square`) become one `act` node, so one small pattern graph covers every spelling.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import networkx as nx
from torch import fx

from ..capture.regions import CapturedRegion
from .vocabulary import ELEM, THROUGH, NodeMeaning, activation_name, classify

ACT = "act"


@dataclass
class ViewNode:
    """A node of the view: one FX node, or a chain of elementwise FX nodes (label `act`)."""

    label: str
    members: list[fx.Node]
    meaning: NodeMeaning
    activation: str | None = None
    through_inputs: list[fx.Node] = field(default_factory=list)

    @property
    def head(self) -> fx.Node:
        return self.members[0]

    @property
    def tail(self) -> fx.Node:
        return self.members[-1]


@dataclass
class PatternView:
    region: CapturedRegion
    graph: nx.DiGraph                      # nodes: tail fx.Node of each ViewNode
    nodes: dict[fx.Node, ViewNode]         # keyed by tail fx.Node
    meaning: dict[fx.Node, NodeMeaning]    # every FX node's label
    projection_calls: Counter = field(default_factory=Counter)  # (owner, weight) -> projection nodes
    placements: dict = field(default_factory=dict)  # pattern -> its placements (found once)
    checked: dict = field(default_factory=dict)     # (pattern, placement) -> its MatchResult
    shared: dict = field(default_factory=dict)      # pattern -> weight-shared FFN calls by weights


def _resolve(node: fx.Node, meaning: dict[fx.Node, NodeMeaning], via: list[fx.Node]) -> fx.Node:
    """Follow pass-through nodes back to the meaningful node that feeds them."""
    while meaning[node].label == THROUGH and node.args and isinstance(node.args[0], fx.Node):
        via.append(node)
        node = node.args[0]
    return node


def node_meaning(node: fx.Node, region: CapturedRegion) -> NodeMeaning:
    """A node's meaning: the label an FFN family gives it, else the shared vocabulary's."""
    from .registry import PATTERNS

    for pattern in PATTERNS:
        meaning = pattern.label_node(node, region)
        if meaning is not None:
            return meaning
    return classify(node, region.module, region.absolute)


def build_view(region: CapturedRegion) -> PatternView:
    meaning = {n: node_meaning(n, region) for n in region.graph.nodes}
    # Chain elementwise nodes: a chain continues while the previous op has this op as its only user.
    chain_of: dict[fx.Node, list[fx.Node]] = {}
    for node in region.graph.nodes:
        if meaning[node].label != ELEM:
            continue
        via: list[fx.Node] = []
        source = _resolve(node.all_input_nodes[0], meaning, via)
        if not via and meaning[source].label == ELEM and len(source.users) == 1 and source in chain_of:
            chain = chain_of.pop(source)
            chain.append(node)
            chain_of[node] = chain
        else:
            chain_of[node] = [node]
    graph = nx.DiGraph()
    nodes: dict[fx.Node, ViewNode] = {}
    for node in region.graph.nodes:
        label = meaning[node].label
        if label == THROUGH or (label == ELEM and node not in chain_of):
            continue
        if label == ELEM:
            members = chain_of[node]
            ops = tuple(meaning[m].op for m in members)
            view_node = ViewNode(ACT, members, meaning[node], activation_name(ops))
        else:
            view_node = ViewNode(label, [node], meaning[node])
        nodes[node] = view_node
        graph.add_node(node, label=view_node.label)
    for tail, view_node in nodes.items():
        for source in view_node.head.all_input_nodes:
            via: list[fx.Node] = []
            origin = _resolve(source, meaning, via)
            origin = _tail_of(origin, nodes)
            if origin is not None:
                graph.add_edge(origin, tail, via=via)
    calls = Counter((m.projection.owner, m.projection.weight) for m in meaning.values()
                    if m.projection is not None)
    return PatternView(region, graph, nodes, meaning, calls)


def _tail_of(node: fx.Node, nodes: dict[fx.Node, ViewNode]) -> fx.Node | None:
    if node in nodes:
        return node
    for tail, view_node in nodes.items():  # a chain member other than the tail (rare)
        if node in view_node.members:
            return tail
    return None
