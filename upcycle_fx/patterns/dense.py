"""Dense FFN: Linear -> activation -> Linear.

GPT-2 (Conv1D), BERT and ViT (split over two modules), OPT (inline), T5, GPT-NeoX, Falcon,
timm, nn.Sequential MLPs, F.linear on raw parameters, squared ReLU, ...
"""

from __future__ import annotations

from .base import FFNPattern, MatchResult, projection
from .registry import register_pattern


@register_pattern
class DenseFFN(FFNPattern):
    """Replaces `down(act(up(x)))`."""

    kind = "dense"
    roles = {"up": "linear", "act": "act", "down": "linear"}
    edges = (("up", "act"), ("act", "down"))
    before_activation = (("up", "act"),)
    after_activation = (("act", "down"),)

    def assemble(self, view, roles) -> MatchResult:
        up, down = projection(view, roles["up"]), projection(view, roles["down"])
        if up.in_features != down.out_features or up.out_features != down.in_features:
            return MatchResult.fail(
                f"shapes {up.in_features}->{up.out_features}->{down.in_features}->{down.out_features} "
                "do not map d_model back to d_model", up.node, down.node)
        return self.site(view, roles, up=up, down=down)
