"""The dispatch core shared by every routing: assignments in, combined expert outputs out.

Two implementations of one contract, `out[t] = Σ_{(t, e, w)} w · expert_e(x[t])`:
`loop` (a plain loop over experts: the test oracle) and `grouped` (stable sort of the
assignments by expert, gather, grouped matmul, weighted scatter-add; no host sync where
`grouped_mm` applies).
"""

from __future__ import annotations

import torch

from .experts import Experts
from .routing import Routing

IMPLEMENTATIONS = ("grouped", "loop")


def dispatch(x: torch.Tensor, routing: Routing, experts: Experts, impl: str = "grouped") -> torch.Tensor:
    """Combine the experts' outputs for tokens x: [T, D] according to `routing`."""
    if impl == "grouped":
        return _dispatch_grouped(x, routing, experts)
    if impl == "loop":
        return _dispatch_loop(x, routing, experts)
    raise ValueError(f"unknown dispatch implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def _accumulator(x: torch.Tensor) -> torch.Tensor:
    """Outputs are summed in float32 at least (float64 stays float64)."""
    return torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _dispatch_loop(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    out = _accumulator(x)
    for expert in range(experts.num_experts):
        rows = (routing.expert_idx == expert).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        tokens = routing.token_idx[rows]
        y = experts.forward_expert(expert, x[tokens]).to(out.dtype)
        out.index_add_(0, tokens, y * routing.weight[rows, None])
    return out.to(x.dtype)


def _dispatch_grouped(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    order = torch.argsort(routing.expert_idx, stable=True)
    expert_sorted = routing.expert_idx[order]
    token_sorted = routing.token_idx[order]
    counts = torch.bincount(expert_sorted, minlength=experts.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    y = experts.forward_grouped(x[token_sorted], expert_sorted, offsets, counts)
    out = _accumulator(x)
    weighted = y.to(out.dtype) * routing.weight[order, None]
    return out.index_add_(0, token_sorted, weighted).to(x.dtype)
