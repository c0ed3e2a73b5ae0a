"""Routing: turn router logits into (token, expert, weight) assignments.

Both routings produce the same `Routing` record, so one dispatch core serves them
(`dispatch.py`). Nothing here synchronises with the host: every shape depends only on
T, E, k and the capacity factor. Routings with a capacity (expert choice, capped top-k)
also lay their assignments out in `Slots`: a static [E, C] table the dispatch can run as
one batched matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .scoring import get_scorer

EXPERT_CHOICE_CAPACITY = 2.0  # the paper's C for expert choice when none is given


@dataclass
class Slots:
    """Capacity layout: slot c of expert e serves token `token[e, c]` with weight `weight[e, c]`.
    Empty slots (`filled` False) point at token 0 with weight 0; the dispatch masks them, so an
    expert that overflows on token 0 cannot reach it through an empty slot (0 · inf = NaN)."""

    token: torch.Tensor   # [E, C] int64
    weight: torch.Tensor  # [E, C] routing dtype
    filled: torch.Tensor  # [E, C] bool


@dataclass
class Routing:
    """Assignments of tokens to experts, one row per (token, expert) pair.

    token_idx, expert_idx: [N] int64; weight: [N] in the routing dtype (0 for dropped
    assignments); kept: [N] bool; probs: [T, E] router probabilities (for the auxiliary losses).
    The routing dtype is float32, or float64 for float64 logits (see `routing_dtype`);
    slots: the same kept assignments as a static [E, C] table, for capacity routings.
    """

    token_idx: torch.Tensor
    expert_idx: torch.Tensor
    weight: torch.Tensor
    kept: torch.Tensor
    probs: torch.Tensor
    num_experts: int
    slots: Slots | None = None

    def expert_load(self) -> torch.Tensor:
        """Kept assignments per expert, [E] int64 (no host sync)."""
        return expert_counts(self.expert_idx, self.num_experts, self.kept.long())


def expert_counts(expert_idx: torch.Tensor, num_experts: int,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert, on device and without a host sync (bincount's output size would
    depend on the data, so it syncs on CUDA)."""
    values = torch.ones_like(expert_idx) if weights is None else weights
    return torch.zeros(num_experts, dtype=values.dtype, device=expert_idx.device).index_add_(
        0, expert_idx, values)


def routing_dtype(logits: torch.Tensor) -> torch.dtype:
    """Routing runs in float32 (rounding-sensitive decisions, ST-MoE), and in float64 for float64
    models, whose combine weights must sum to 1 to float64 precision to keep the function."""
    return torch.promote_types(logits.dtype, torch.float32)


def top_k_routing(logits: torch.Tensor, k: int, *, normalize: bool,
                  capacity_factor: float | None = None, scoring: str = "softmax",
                  bias: torch.Tensor | None = None, scale: float = 1.0) -> Routing:
    """Token choice: score all experts (`scoring`: softmax by default), each token takes its k best.

    With `bias` ([E], auxiliary-loss-free balancing) the k are chosen on scores + bias while the
    weights stay the unbiased scores. With `normalize`, the k weights are renormalised to sum to
    1 (function-preserving with identical experts); `scale` then multiplies them (weight scaling,
    DeepSeek-V3's routed scaling factor). With a `capacity_factor` C, each expert keeps at most
    ceil(C·T·k/E) assignments, first choices before second choices, earlier tokens first (GShard
    priority); the rest get weight 0 and the token's output falls back to the residual path.
    """
    num_tokens, num_experts = logits.shape
    scorer = get_scorer(scoring)
    scores = scorer.scores(logits.to(routing_dtype(logits)))
    probs = scorer.distribution(scores)
    if bias is None:
        weight, expert = torch.topk(scores, k, dim=-1)
    else:
        _, expert = torch.topk(scores + bias.to(scores.dtype), k, dim=-1)
        weight = scores.gather(1, expert)
    if normalize:  # (a sigmoid score can underflow to 0 for a clamped logit: no 0/0)
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    if scale != 1.0:
        weight = weight * scale
    # k-major order: all first choices, then all second choices (capacity priority).
    expert_idx = expert.t().reshape(-1)
    weight = weight.t().reshape(-1)
    token_idx = torch.arange(num_tokens, device=logits.device).repeat(k)
    kept = torch.ones_like(expert_idx, dtype=torch.bool)
    if capacity_factor is None:
        return Routing(token_idx, expert_idx, weight, kept, probs, num_experts)
    # A token takes an expert at most once, so no expert needs more than T slots.
    capacity = min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens * k / num_experts)))
    one_hot = torch.nn.functional.one_hot(expert_idx, num_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    kept = position < capacity
    weight = torch.where(kept, weight, torch.zeros_like(weight))
    # Kept assignments go to slot (expert, position); dropped ones to a spare slot cut off after.
    slot = torch.where(kept, expert_idx * capacity + position, num_experts * capacity)
    table_token = torch.zeros(num_experts * capacity + 1, dtype=torch.long, device=logits.device)
    table_weight = torch.zeros(num_experts * capacity + 1, dtype=weight.dtype, device=logits.device)
    table_filled = torch.zeros(num_experts * capacity + 1, dtype=torch.bool, device=logits.device)
    table_token.scatter_(0, slot, token_idx)
    table_weight.scatter_(0, slot, weight)
    table_filled.scatter_(0, slot, kept)
    slots = Slots(table_token[:-1].view(num_experts, capacity),
                  table_weight[:-1].view(num_experts, capacity),
                  table_filled[:-1].view(num_experts, capacity))
    return Routing(token_idx, expert_idx, weight, kept, probs, num_experts, slots)


def expert_choice_routing(logits: torch.Tensor, capacity_factor: float, *,
                          scoring: str = "softmax") -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes its top ceil(C·T/E) tokens.

    Static shapes and perfect balance; a token may get zero or several experts. It looks at all
    tokens of the batch at once, so it is not causal (mind autoregressive decoding).
    """
    num_tokens, num_experts = logits.shape
    scorer = get_scorer(scoring)
    scores = scorer.scores(logits.to(routing_dtype(logits)))
    probs = scorer.distribution(scores)
    capacity = min(num_tokens, max(1, math.ceil(capacity_factor * num_tokens / num_experts)))
    weight, token = torch.topk(scores.t(), capacity, dim=-1)  # [E, capacity]
    expert_idx = torch.arange(num_experts, device=logits.device).repeat_interleave(capacity)
    token_idx = token.reshape(-1)
    kept = torch.ones_like(token_idx, dtype=torch.bool)
    slots = Slots(token, weight, torch.ones_like(token, dtype=torch.bool))
    return Routing(token_idx, expert_idx, weight.reshape(-1), kept, probs, num_experts, slots)
