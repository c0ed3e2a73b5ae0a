"""Gated FFN with separate projections: down(act(gate(x)) * up(x)).

Llama, Mistral, Qwen2 (SwiGLU), Gemma (GeGLU), T5 gated-gelu, sigmoid-gated GLU variants.
"""

from __future__ import annotations

import torch

from ..moe.experts import FFNWeights
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
        return self.site(view, roles, up=up, down=down, gate=gate)

    def dense_weights(self, site: FFNSite, model) -> FFNWeights:
        """[gate; up] rows; where only one of gate and up has a bias, that half's bias alone."""
        gate, gate_bias = site.gate.tensors(model)
        up, up_bias = site.up.tensors(model)
        down, down_bias = site.down.tensors(model)
        half = None
        if (gate_bias is None) != (up_bias is None):
            half = 0 if gate_bias is not None else 1
            bias = gate_bias if gate_bias is not None else up_bias
        else:
            bias = None if up_bias is None else torch.cat([gate_bias, up_bias])
        return FFNWeights(torch.cat([gate, up]), bias, down, down_bias, gated=True, up_bias_half=half)
