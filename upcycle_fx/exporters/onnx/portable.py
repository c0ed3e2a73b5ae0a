"""The portable lowering: one MoE layer in standard ONNX operators, every expert kept.

Formulation ("dense with a combine matrix", research/anchors-onnx.md §4):

1. routing -> a [T, E] float32 matrix of combine weights, zero where a token does not use an
   expert: token-choice top-k (the layer's scorer over all experts, top-k on the scores plus the
   balancing bias if any, optional renormalisation, scaling, optional capacity with GShard
   priority) or expert choice (each expert keeps its best ⌈C·T/E⌉ tokens) — the same routing as
   `upcycle_fx.moe.routing`, written with static shapes;
2. every expert on every token: two batched MatMuls over the stacked `[E, out, in]` weights,
   with the experts' own activation module (`Experts.hidden`) in between;
3. output = Σ_e weight[:, e] · expert_e(x).

Why this one: its shapes are static (no NonZero, no host synchronisation, CUDA-graph friendly),
it takes any activation the experts have, and it keeps every expert by construction (an
exporter that traces with a dummy input cannot drop an expert the input never reached). The cost
is E/k times the FLOPs of exact dispatch: this is the fallback for runtimes and layers the fused
node cannot serve, not the fast path.

Capacities follow the core's formulas: an assignment at position p (0-based, in priority order)
is kept when p < ⌈C·T·k/E⌉, i.e. when p < C·T·k/E, which is computed in float64 in the core's
operation order so the threshold is bit-identical for any dynamic T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...moe.experts import up_bias_rows
from ...moe.scoring import get_scorer


def combine_weights(logits: Tensor, settings, num_experts: int, bias: Tensor | None = None) -> Tensor:
    """[T, E] float32 combine weights for router logits [T, E] under `settings` (MoESettings);
    `bias`: the layer's selection bias (balancing="bias")."""
    probs = get_scorer(settings.scoring).scores(logits.float())
    if settings.routing == "expert_choice":
        return _expert_choice(probs, settings.capacity)
    return _top_k(probs, settings.top_k, settings.normalize_weights, settings.capacity_factor, num_experts,
                  bias, settings.combine_scale(num_experts))


def _capacity_threshold(num_tokens, factor: float, k: int, num_experts: int, device) -> Tensor:
    """C·T·k/E as a float64 scalar tensor, evaluated like the core's Python expression."""
    tokens = torch.ones((), dtype=torch.float64, device=device) * num_tokens
    return tokens * factor * k / num_experts   # (C·T)·k/E; ·1 is exact, so k=1 gives C·T/E


def _top_k(probs: Tensor, k: int, normalize: bool, capacity_factor: float | None,
           num_experts: int, bias: Tensor | None = None, scale: float = 1.0) -> Tensor:
    if bias is None:
        weight, expert = torch.topk(probs, k, dim=-1)                  # [T, k]
    else:
        _, expert = torch.topk(probs + bias.float(), k, dim=-1)
        weight = probs.gather(1, expert)
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    if scale != 1.0:
        weight = weight * scale
    if capacity_factor is not None:
        # k-major priority (all first choices, then all second choices, earlier tokens first).
        choice = expert.t().reshape(-1, 1) == torch.arange(num_experts, device=probs.device)
        choice = choice.to(torch.int64)                                # [k·T, E] one-hot
        position = (choice.cumsum(dim=0) * choice).sum(dim=-1) - 1     # [k·T]
        limit = _capacity_threshold(probs.shape[0], capacity_factor, k, num_experts, probs.device)
        kept = position.to(torch.float64) < limit
        weight = weight * kept.reshape(k, -1).t().to(weight.dtype)
    return torch.zeros_like(probs).scatter(1, expert, weight)


def _expert_choice(probs: Tensor, capacity_factor: float) -> Tensor:
    num_tokens, num_experts = probs.shape
    ranked, token = torch.sort(probs.t(), dim=-1, descending=True)    # [E, T]
    rank = torch.arange(num_tokens, device=probs.device).to(torch.float64)
    limit = _capacity_threshold(num_tokens, capacity_factor, 1, num_experts, probs.device)
    kept = ranked * (rank < limit).to(ranked.dtype)
    return torch.zeros_like(probs.t()).scatter(1, token, kept).t()


def all_experts(experts, tokens: Tensor) -> Tensor:
    """Every expert on every token: [T, D] -> [E, T, D] (eval: no hidden dropout)."""
    hidden = torch.matmul(tokens.unsqueeze(0), experts.up_proj.transpose(1, 2))
    up_bias = up_bias_rows(experts)
    if up_bias is not None:
        hidden = hidden + up_bias.unsqueeze(1)
    out = torch.matmul(experts.hidden(hidden), experts.down_proj.transpose(1, 2))
    if experts.down_bias is not None:
        out = out + experts.down_bias.unsqueeze(1)
    return out


def portable_forward(moe, x: Tensor) -> Tensor:
    """What a portable MoE layer computes during export (same contract as MoE.forward)."""
    tokens = x.reshape(-1, x.shape[-1])
    weight = combine_weights(moe.router(tokens), moe.settings, moe.num_experts,
                             moe._buffers.get("expert_bias"))                     # [T, E]
    outputs = all_experts(moe.experts, tokens)                                     # [E, T, D]
    accumulate = torch.promote_types(x.dtype, torch.float32)
    out = (outputs.to(accumulate) * weight.t().unsqueeze(-1).to(accumulate)).sum(dim=0)
    return out.to(x.dtype).reshape(x.shape)
