"""FFNs with a norm on their hidden vector, before the down projection: named near misses.

Kosmos-2.5's text FFN (`down(LayerNorm(act(up(x))))`), BitNet's (`down(RMSNorm(act(gate(x)) *
up(x)))`). The experts run `down(act(up x))` (or `down(act(gate x) * up x)`): nothing of
theirs runs between the activation (or the gate product) and the down projection, so these
FFNs are reported, with the norm named, instead of being found as something else or not at all.
"""

from __future__ import annotations

from typing import Iterator

from torch import fx

from .base import ANY, FFNPattern, MatchResult, projection
from .registry import register_pattern

OTHER = "other"


class _HiddenNorm(FFNPattern):
    """A placement whose `norm` role is a module named like a norm and whose projections map
    d_model -> d_ff -> d_model; `assemble` says why it cannot become experts."""

    where: str

    def placements(self, view) -> Iterator[dict[str, fx.Node]]:
        for roles in super().placements(view):
            norm, up, down = roles["norm"], projection(view, roles["up"]), projection(view, roles["down"])
            if (norm.op == "call_module" and "Norm" in type(view.region.module(norm.target)).__name__
                    and up.in_features == down.out_features and up.out_features == down.in_features):
                yield roles

    def assemble(self, view, roles) -> MatchResult:
        norm = roles["norm"]
        name = type(view.region.module(norm.target)).__name__
        return MatchResult.fail(
            f"a {name} ({view.region.absolute(norm.target)}) normalises the FFN's hidden vector "
            f"{self.where} and the down projection; the experts have no place for it, so this FFN "
            "cannot be upcycled", norm)


@register_pattern
class DenseHiddenNorm(_HiddenNorm):
    """`down(norm(act(up(x))))` (Kosmos-2.5)."""

    kind = "dense_hidden_norm"
    where = "between the activation"
    roles = {"up": "linear", "act": "act", "norm": OTHER, "down": "linear"}
    edges = (("up", "act"), ("act", "norm"), ("norm", "down"))


@register_pattern
class GatedHiddenNorm(_HiddenNorm):
    """`down(norm(act(gate(x)) * up(x)))` (BitNet's ffn_sub_norm)."""

    kind = "gated_hidden_norm"
    where = "between the gate product"
    roles = {"x": ANY, "gate": "linear", "up": "linear", "act": "act", "mul": "mul", "norm": OTHER,
             "down": "linear"}
    edges = (("x", "gate"), ("x", "up"), ("gate", "act"), ("act", "mul"), ("up", "mul"), ("mul", "norm"),
             ("norm", "down"))

    def placements(self, view) -> Iterator[dict[str, fx.Node]]:
        for roles in super().placements(view):
            if projection(view, roles["gate"]).out_features == projection(view, roles["down"]).in_features:
                yield roles
