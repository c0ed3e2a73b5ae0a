"""FFNs with a convolution that mixes neighbouring tokens between their projections (Mix-FFN):
named near misses.

SegFormer, GLPN and PVTv2 run `down(act(dwconv(up(x))))`, the depthwise convolution reading the
hidden vectors of neighbouring positions (the tokens reshaped into an image). An expert sees one
token at a time, so such an FFN cannot become experts; this family finds it and says so.
"""

from __future__ import annotations

from typing import Iterator

from torch import fx, nn

from .base import FFNPattern, MatchResult, projection
from .registry import register_pattern
from .view import ACT

MAX_STEPS = 12  # view nodes searched between the up projection and the activation


def _mixes_positions(module: nn.Module) -> bool:
    """A convolution with a kernel wider than one position."""
    return isinstance(module, nn.modules.conv._ConvNd) and any(k > 1 for k in module.kernel_size)


@register_pattern
class MixingConvFFN(FFNPattern):
    """`down(act(... conv ... (up(x))))` with a token-mixing convolution on the way."""

    kind = "mixing_conv"
    roles = {"up": "linear", "mix": "other", "act": ACT, "down": "linear"}
    edges = (("up", "mix"), ("mix", "act"), ("act", "down"))

    def placements(self, view) -> Iterator[dict[str, fx.Node]]:
        for act, down in view.graph.edges:
            if view.graph.nodes[act]["label"] != ACT or view.graph.nodes[down]["label"] != "linear":
                continue
            found = self._up_through_conv(view, act)
            if found is not None:
                up, conv = found
                u, d = projection(view, up), projection(view, down)
                if u.in_features == d.out_features and u.out_features == d.in_features:
                    yield {"up": up, "mix": conv, "act": act, "down": down}

    def _up_through_conv(self, view, act: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """(up projection, mixing conv) reached backwards from `act` through non-projections."""
        conv, node = None, act
        for _ in range(MAX_STEPS):
            sources = [s for s in view.graph.predecessors(node) if view.graph.nodes[s]["label"] in ("other", ACT, "linear")]
            tensors = [s for s in sources if view.graph.nodes[s]["label"] != "other" or s.op != "placeholder"]
            if not tensors:
                return None
            node = tensors[0]
            if view.graph.nodes[node]["label"] == "linear":
                return (node, conv) if conv is not None else None
            if node.op == "call_module" and _mixes_positions(view.region.module(node.target)):
                conv = node
        return None

    def assemble(self, view, roles) -> MatchResult:
        conv = roles["mix"]
        return MatchResult.fail(
            f"the {type(view.region.module(conv.target)).__name__} at {view.region.absolute(conv.target)} "
            "between the FFN's projections mixes neighbouring tokens (a Mix-FFN's depthwise "
            "convolution); an expert sees one token at a time, so this FFN cannot be upcycled", conv)
