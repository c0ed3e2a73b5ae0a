"""Gated FFN with separate projections: down(act(gate(x)) * up(x)).

Llama, Mistral, Qwen2 (SwiGLU), Gemma (GeGLU), T5 gated-gelu, sigmoid-gated GLU variants.
"""

from __future__ import annotations

from .base import ANY, FFNPattern, FFNSite, MatchResult, projection
from .registry import register_pattern


@register_pattern
class GatedFFN(FFNPattern):
    """Replaces `down(act(gate(x)) * up(x))` (either operand order)."""

    kind = "gated"
    roles = {"x": ANY, "gate": "linear", "up": "linear", "act": "act", "mul": "mul", "down": "linear"}
    edges = (("x", "gate"), ("x", "up"), ("gate", "act"), ("act", "mul"), ("up", "mul"), ("mul", "down"))
    before_activation = (("gate", "act"), ("up", "mul"))
    after_activation = (("act", "mul"), ("mul", "down"))

    def assemble(self, view, roles) -> MatchResult:
        gate, up, down = (projection(view, roles[r]) for r in ("gate", "up", "down"))
        if gate.node.args[0] is not up.node.args[0]:
            return MatchResult.fail("gate and up projections read different inputs", gate.node, up.node)
        d_model, d_ff = down.out_features, down.in_features
        shapes = {(gate.in_features, gate.out_features), (up.in_features, up.out_features)}
        if shapes != {(d_model, d_ff)}:
            return MatchResult.fail(f"gate/up shapes {sorted(shapes)} do not match down "
                                    f"{d_ff}->{d_model}", gate.node, up.node, down.node)
        act = view.nodes[roles["act"]]
        return MatchResult(FFNSite(
            kind=self.kind, activation=act.activation, up=up, down=down, gate=gate, gate_half=None,
            x=up.node.args[0], y=down.node, members=self.collect_members(view, roles),
            activation_nodes=act.members, region=view.region))
