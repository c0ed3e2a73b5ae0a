"""Gated FFN with constant multipliers: down(act(gate(x) * a) * up(x)) * b.

Falcon-H1 (`mlp_multipliers`). The constants fold into the weights, the gate rows (and bias)
times a, the down projection (and bias) times b, so each expert is a plain gated FFN.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import fx

from ..moe.experts import FFNWeights
from .base import ANY, FFNSite, MatchResult
from .gated import GatedFFN
from .registry import register_pattern


@dataclass
class ScaledGatedSite(FFNSite):
    gate_scale: float = 1.0  # a: multiplies the gate projection's output
    out_scale: float = 1.0   # b: multiplies the down projection's output


def constant_factor(node: fx.Node, operand: fx.Node) -> float | None:
    """c for `operand * c` or `c * operand` with c a number, else None."""
    if node.op == "call_function" and node.target in (operator.mul, torch.mul):
        args = node.args
    elif node.op == "call_method" and node.target == "mul":
        args = node.args
    else:
        return None
    if len(args) != 2 or node.kwargs or operand not in args:
        return None
    other = args[1] if args[0] is operand else args[0]
    return float(other) if isinstance(other, numbers.Number) and not isinstance(other, bool) else None


@register_pattern
class ScaledGatedFFN(GatedFFN):
    """Replaces `down(act(gate(x) * a) * up(x)) * b` (either operand orders)."""

    kind = "scaled_gated"
    roles = {"x": ANY, "gate": "linear", "gate_scale": "other", "up": "linear", "act": "act", "mul": "mul",
             "down": "linear", "out_scale": "other"}
    edges = (("x", "gate"), ("x", "up"), ("gate", "gate_scale"), ("gate_scale", "act"), ("act", "mul"),
             ("up", "mul"), ("mul", "down"), ("down", "out_scale"))
    before_activation = (("gate", "gate_scale"), ("gate_scale", "act"), ("up", "mul"), ("down", "out_scale"))
    after_activation = (("act", "mul"), ("mul", "down"))

    def placements(self, view) -> Iterator[dict[str, fx.Node]]:
        for roles in super().placements(view):
            if self._scales(view, roles) is not None:
                yield roles

    def _scales(self, view, roles) -> tuple[float, float] | None:
        a = constant_factor(roles["gate_scale"], _through(view, roles["gate"], roles["gate_scale"]))
        b = constant_factor(roles["out_scale"], _through(view, roles["down"], roles["out_scale"]))
        return None if a is None or b is None else (a, b)

    def assemble(self, view, roles) -> MatchResult:
        result = super().assemble(view, roles)
        if not result:
            return result
        a, b = self._scales(view, roles)
        site = result.site
        return self.site(view, roles, up=site.up, down=site.down, gate=site.gate, y=roles["out_scale"],
                         site_class=ScaledGatedSite, gate_scale=a, out_scale=b)

    def dense_weights(self, site: ScaledGatedSite, model) -> FFNWeights:
        w = super().dense_weights(site, model)
        d_ff, a, b = site.d_ff, site.gate_scale, site.out_scale
        up = torch.cat([w.up[:d_ff] * a, w.up[d_ff:]])
        up_bias = w.up_bias
        if up_bias is not None and w.up_bias_half is None:
            up_bias = torch.cat([up_bias[:d_ff] * a, up_bias[d_ff:]])
        elif up_bias is not None and w.up_bias_half == 0:
            up_bias = up_bias * a
        return FFNWeights(up, up_bias, w.down * b, None if w.down_bias is None else w.down_bias * b,
                          gated=True, up_bias_half=w.up_bias_half)


def _through(view, source: fx.Node, node: fx.Node) -> fx.Node:
    """The input of `node` that carries `source`'s value (past any pass-through nodes)."""
    via = view.graph.edges[source, node]["via"]
    return via[0] if via else source
