"""Auxiliary router losses: Switch load balancing (per micro-batch or per global batch) and ST-MoE z-loss."""

from __future__ import annotations

import torch

from .routing import Routing, expert_counts


def balance_totals(routing: Routing) -> torch.Tensor:
    """What the load-balancing loss needs of a batch, as sums (so batches add up), float64,
    detached: [E assignment counts (before capacity dropping), E router probability sums,
    assignments, tokens]."""
    counts = expert_counts(routing.expert_idx, routing.num_experts).double()
    probs = routing.probs.detach().sum(dim=0).double()
    sizes = [counts.new_full((1,), n) for n in (routing.expert_idx.numel(), routing.probs.shape[0])]
    return torch.cat([counts, probs, *sizes])  # (new_full: a fill kernel, no copy from the host)


def load_balancing_loss(routing: Routing, totals: torch.Tensor | None = None) -> torch.Tensor:
    """Switch Transformer loss E · Σ_e f_e · P_e (1.0 when perfectly balanced).

    f_e: fraction of assignments routed to expert e (before capacity dropping), from this
    batch, or from `totals` (`balance_totals` summed over the micro-batches of a global batch:
    f is then the global batch's); P_e: mean router probability of expert e over this batch.
    Gradients flow through P_e only.
    """
    num_experts = routing.num_experts
    if totals is None:
        counts = expert_counts(routing.expert_idx, num_experts).to(routing.probs.dtype)
        fraction = counts / routing.expert_idx.numel()
    else:
        fraction = (totals[:num_experts] / totals[2 * num_experts]).to(routing.probs.dtype)
    return num_experts * torch.sum(fraction * routing.probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean of logsumexp(logits)² over tokens; keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
