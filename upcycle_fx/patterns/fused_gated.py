"""Gated FFN with one fused [gate | up] projection split by chunk, split, slicing or a view.

Phi-3 (`gate_up_proj` + `chunk(2)`), sigmoid-gated models slicing `h[..., :f]` / `h[..., f:]`,
Moshi (`h.view(B, T, 2, -1)` then `h[..., 0, :]` / `h[..., 1, :]`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..moe.experts import FFNWeights
import operator

from torch import fx

from .base import FFNPattern, FFNSite, MatchResult, part_of, projection
from .registry import register_pattern
from .vocabulary import PART, THROUGH, NodeMeaning, Part, split_spec


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

    def label_node(self, node: fx.Node, region) -> NodeMeaning | None:
        """The view of the fused output as [..., 2, d_ff] is a split; its [..., i, :] a part."""
        if _halves_view(node) is not None and node.users and all(_view_half(u) is not None for u in node.users):
            return NodeMeaning(THROUGH)
        index = _view_half(node)
        return None if index is None else NodeMeaning(PART, part=Part(index=index))

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
        spec = next((split_spec(n) or _halves_view(n) for n in via
                     if (split_spec(n) or _halves_view(n)) is not None), None)
        halves = spec in (("chunk", 2), ("split", d_ff), ("view", d_ff), ("view", -1))
        return part.index if halves and part.index in (0, 1) else None
    start, stop = part.start or 0, part.stop
    if (start, stop) == (0, d_ff):
        return 0
    if start == d_ff and stop in (None, 2 * d_ff):
        return 1
    return None


def _halves_view(node: fx.Node) -> tuple[str, int] | None:
    """("view", d_ff) for `h.view(*lead, 2, d_ff)` (or reshape) that splits h's last dim in two
    halves and keeps its leading dims, as the shadow values show, or ("view", -1) for
    `h.view(h.shape[0], ..., 2, -1)` (a symbolic trace); None for anything else."""
    if node.op != "call_method" or node.target not in ("view", "reshape") or len(node.args) < 3:
        return None
    source, *lead, two, last = node.args
    if two != 2 or not isinstance(source, fx.Node):
        return None
    out, shadow = node.meta.get("shadow"), source.meta.get("shadow")
    if isinstance(out, torch.Tensor) and isinstance(shadow, torch.Tensor):
        if out.shape[:-2] != shadow.shape[:-1] or 2 * out.shape[-1] != shadow.shape[-1]:
            return None
        return ("view", int(out.shape[-1]))
    if last == -1 and all(_size_of(arg, source, i) for i, arg in enumerate(lead)):
        return ("view", -1)
    return None


def _size_of(arg, source: fx.Node, dim: int) -> bool:
    """Whether `arg` is `source.shape[dim]` or `source.size(dim)`."""
    if not isinstance(arg, fx.Node):
        return False
    if arg.op == "call_method" and arg.target == "size":
        return arg.args[:1] == (source,) and (arg.args[1:] or (arg.kwargs.get("dim"),)) == (dim,)
    shape = arg.args[0] if arg.op == "call_function" and arg.target is operator.getitem else None
    return (isinstance(shape, fx.Node) and arg.args[1] == dim and shape.op == "call_function"
            and shape.target is getattr and shape.args == (source, "shape"))


def _view_half(node: fx.Node) -> int | None:
    """i for `v[..., i, :]` (i in 0, 1) of a halves view `v`, else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    source, index = node.args
    if not (isinstance(source, fx.Node) and _halves_view(source) is not None and isinstance(index, tuple)):
        return None
    if len(index) == 3 and index[0] is Ellipsis and index[1] in (0, 1) and index[2] == slice(None):
        return index[1]
    return None
