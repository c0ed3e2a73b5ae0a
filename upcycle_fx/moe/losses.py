"""Auxiliary router losses: Switch load balancing and ST-MoE z-loss."""

from __future__ import annotations

import torch

from .routing import Routing, expert_counts


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """Switch Transformer loss E · Σ_e f_e · P_e (1.0 when perfectly balanced).

    f_e: fraction of assignments routed to expert e (before capacity dropping);
    P_e: mean router probability of expert e. Gradients flow through P_e.
    """
    num_experts = routing.num_experts
    counts = expert_counts(routing.expert_idx, num_experts).to(routing.probs.dtype)
    fraction = counts / routing.expert_idx.numel()
    return num_experts * torch.sum(fraction * routing.probs.mean(dim=0))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean of logsumexp(logits)² over tokens; keeps router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
