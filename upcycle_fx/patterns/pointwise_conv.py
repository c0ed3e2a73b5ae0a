"""Dense FFN of 1x1 convolutions over channels: down(act(up(x))) on x of shape [B, C, T] or
[B, C, H, W].

SqueezeBERT (two `nn.Conv1d(kernel_size=1)`, grouped), SwiftFormer (`nn.Conv2d(..., 1)`). A 1x1
convolution is a linear map of the channels at each position, and a grouped one a
block-diagonal linear map: the experts take the
equivalent `nn.Linear` weight (block-diagonal where grouped: the same function, though the
zeros between the blocks become trainable weights), and the rewrite hands the MoE the channels
as the last dim (`channel_dim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..capture.regions import CapturedRegion
from .base import FFNPattern, MatchResult, projection
from .registry import register_pattern
from .vocabulary import NodeMeaning, Projection

POINTWISE_CONV = "pointwise_conv"


_CONVS = (nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class PointwiseConvProjection(Projection):
    """A 1x1 convolution: weight [out, in / groups, 1(, 1)]."""

    groups: int = 1

    def tensors(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        conv = model.get_submodule(self.owner)
        blocks = conv.weight.flatten(1).chunk(self.groups, dim=0)
        return torch.block_diag(*blocks), conv.bias


def is_pointwise_conv(module: nn.Module) -> bool:
    """A Conv1d / Conv2d that maps each position's channels alone: kernel 1, stride 1, no padding."""
    if not isinstance(module, _CONVS):
        return False
    ones = (1,) * len(module.kernel_size)
    return (module.kernel_size == ones and module.stride == ones and module.dilation == ones
            and (module.padding == "valid" or module.padding == (0,) * len(ones)))


def conv_problem(module: nn.Module, path: str) -> str | None:
    """Why the conv does more than the stock `nn.Conv1d` / `nn.Conv2d` computation (a quantised or
    patched subclass), or None."""
    stock = next(c for c in _CONVS if isinstance(module, c))
    cls = type(module)
    if cls.forward is not stock.forward or cls._conv_forward is not stock._conv_forward:
        return (f"{cls.__name__} overrides {stock.__name__}'s forward (a quantised or patched "
                f"convolution?) at {path}: the experts would copy only its weight")
    return None


@register_pattern
class PointwiseConvFFN(FFNPattern):
    """Replaces `down(act(up(x)))` where up and down are 1x1 convolutions."""

    kind = "pointwise_conv"
    roles = {"up": POINTWISE_CONV, "act": "act", "down": POINTWISE_CONV}
    edges = (("up", "act"), ("act", "down"))
    before_activation = (("up", "act"),)
    after_activation = (("act", "down"),)

    def label_node(self, node: fx.Node, region: CapturedRegion) -> NodeMeaning | None:
        if node.op != "call_module" or not is_pointwise_conv(module := region.module(node.target)):
            return None
        bias = "bias" if module.bias is not None else None
        return NodeMeaning(POINTWISE_CONV, PointwiseConvProjection(
            node, region.absolute(node.target), "weight", bias, POINTWISE_CONV, module.in_channels,
            module.out_channels, module.groups))

    def assemble(self, view, roles) -> MatchResult:
        up, down = projection(view, roles["up"]), projection(view, roles["down"])
        if up.in_features != down.out_features or up.out_features != down.in_features:
            return MatchResult.fail(
                f"channels {up.in_features}->{up.out_features}->{down.in_features}->{down.out_features} "
                "do not map d_model back to d_model", up.node, down.node)
        for proj in (up, down):
            problem = conv_problem(view.region.module(proj.node.target), proj.owner)
            if problem is not None:
                return MatchResult.fail(problem, proj.node)
        channel_dim = -1 - len(view.region.module(up.node.target).kernel_size)  # [..., C, T] / [..., C, H, W]
        return self.site(view, roles, up=up, down=down, channel_dim=channel_dim)
