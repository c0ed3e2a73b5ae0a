"""Scorers: how router logits become the per-expert scores that routing selects and weighs by.

A scorer is one function `[T, E] logits -> [T, E] non-negative scores` plus the score every
expert gets when all logits are equal (`uniform`), which fixes the weight scaling that makes an
unnormalised upcycled layer compute the dense function at conversion. A new method is one
function and one `register_scorer` call; `UpcycleConfig(scoring=...)` accepts every registered
name. Built in:

* `softmax`: softmax over all experts (Switch, Mixtral, Qwen-MoE); scores sum to 1.
* `sigmoid`: an independent sigmoid per expert (DeepSeek-V3); with `normalize_weights` the chosen
  scores are renormalised, so identical experts still give exactly the dense FFN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UpcycleConfigError


@dataclass(frozen=True)
class Scorer:
    """A registered scoring method (see module doc)."""

    name: str
    scores: Callable[[torch.Tensor], torch.Tensor]
    uniform: Callable[[int], float]   # num_experts -> each expert's score when all logits are equal
    sums_to_one: bool = False         # scores of a token already form a distribution
    # log of the scores up to a per-token constant (softmax of it is `distribution`), or None:
    # what lets a softmax-routing kernel (onnxruntime's fused MoE node) route by these scores
    log_scores: Callable[[torch.Tensor], torch.Tensor] | None = None

    def distribution(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores as a distribution over experts per token: the P_e of the load-balancing loss."""
        if self.sums_to_one:
            return scores
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


SCORERS: dict[str, Scorer] = {}


def register_scorer(name: str, scores: Callable[[torch.Tensor], torch.Tensor], *,
                    uniform: Callable[[int], float], sums_to_one: bool = False,
                    log_scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    replace: bool = False) -> Scorer:
    """Make `scoring=name` available: `scores` maps float32 (or float64) logits [T, E] to
    non-negative scores [T, E] of the same dtype; `uniform(E)` is each expert's score when all
    logits are equal; `log_scores` (optional) the log of the scores up to a per-token constant,
    which lets the fused ONNX node serve the scorer. Registering a taken name needs `replace=True`."""
    if not isinstance(name, str) or not name:
        raise UpcycleConfigError(f"scorer name {name!r} must be a non-empty string.")
    if name in SCORERS and not replace:
        raise UpcycleConfigError(f"scorer {name!r} is already registered; pass replace=True to "
                                 "replace it.")
    scorer = Scorer(name, scores, uniform, sums_to_one, log_scores)
    SCORERS[name] = scorer
    return scorer


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except (KeyError, TypeError):
        raise UpcycleConfigError(f"scoring={name!r} is unknown; registered scorers: "
                                 f"{sorted(SCORERS)} (upcycle_fx.moe.scoring.register_scorer adds one).") from None


register_scorer("softmax", lambda logits: torch.softmax(logits, dim=-1),
                uniform=lambda num_experts: 1.0 / num_experts, sums_to_one=True,
                log_scores=lambda logits: logits)
register_scorer("sigmoid", torch.sigmoid, uniform=lambda num_experts: 0.5,
                log_scores=torch.nn.functional.logsigmoid)
