"""Gated FFN with one fused [gate | up] projection split by chunk, split or slicing.

Phi-3 (`gate_up_proj` + `chunk(2)`), sigmoid-gated models slicing `h[..., :f]` / `h[..., f:]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moe.experts import FFNWeights
from .base import FFNPattern, FFNSite, MatchResult, part_of, projection
from .registry import register_pattern
from .vocabulary import Part, split_spec


@dataclass
class FusedGatedSite(FFNSite):
    gate_half: int = 0  # which half (0 or 1) of the fused projection's output is the gate


@register_pattern
class FusedGatedFFN(FFNPattern):
    """Replaces `down(act(split(proj(x))[g]) * split(proj(x))[u])`."""

    kind = "fused_gated"
    roles = {"proj": "linear", "gate_part": "part", "up_part": "part", "act": "act", "mul": "mul",
             "down": "linear"}
    edges = (("proj", "gate_part"), ("proj", "up_part"), ("gate_part", "act"), ("act", "mul"),
             ("up_part", "mul"), ("mul", "down"))
    before_activation = (("gate_part", "act"), ("up_part", "mul"))
    after_activation = (("act", "mul"), ("mul", "down"))

    def assemble(self, view, roles) -> MatchResult:
        proj, down = projection(view, roles["proj"]), projection(view, roles["down"])
        d_model, d_ff = down.out_features, down.in_features
        if (proj.in_features, proj.out_features) != (d_model, 2 * d_ff):
            return MatchResult.fail(f"fused projection {proj.in_features}->{proj.out_features} is not "
                                    f"{d_model}->2x{d_ff}", proj.node, down.node)
        gate = _half(view, roles["gate_part"], roles["proj"], d_ff)
        up = _half(view, roles["up_part"], roles["proj"], d_ff)
        if gate is None or up is None or {gate, up} != {0, 1}:
            return MatchResult.fail("the two parts are not the two halves of the fused projection",
                                    roles["gate_part"], roles["up_part"])
        return self.site(view, roles, up=proj, down=down, site_class=FusedGatedSite, gate_half=gate)

    def dense_weights(self, site: FusedGatedSite, model) -> FFNWeights:
        """The fused rows as they are, gate half first (swapped where the up half comes first)."""
        up, up_bias = site.up.tensors(model)
        down, down_bias = site.down.tensors(model)
        if site.gate_half == 1:
            up = torch.cat(up.chunk(2)[::-1])
            up_bias = None if up_bias is None else torch.cat(up_bias.chunk(2)[::-1])
        return FFNWeights(up, up_bias, down, down_bias, gated=True)


def _half(view, part_node, proj_node, d_ff: int) -> int | None:
    """Which half (0 or 1) of the fused output a part takes, or None if it is not a half."""
    part: Part = part_of(view, part_node)
    if part.index is not None:
        via = view.graph.edges[proj_node, part_node]["via"]
        spec = next((split_spec(n) for n in via if split_spec(n) is not None), None)
        halves = spec in (("chunk", 2), ("split", d_ff))
        return part.index if halves and part.index in (0, 1) else None
    start, stop = part.start or 0, part.stop
    if (start, stop) == (0, d_ff):
        return 0
    if start == d_ff and stop in (None, 2 * d_ff):
        return 1
    return None
