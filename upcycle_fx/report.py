"""Numbers about an upcycled model: parameters, active parameters per token, error vs dense."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .moe import MoE, MoESettings


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied weights count once)."""
    return sum(p.numel() for p in model.parameters())


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """[(qualified name, MoE), ...] in the execution order of the FFNs they replaced."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    return sorted(found, key=lambda item: item[1].mlp_index)


def active_parameters(model: nn.Module) -> float:
    """Parameters one token uses: all, minus the experts it is not routed to."""
    total = count_parameters(model)
    for _, moe in moe_layers(model):
        per_token = moe.settings.experts_per_token(moe.num_experts)
        total -= (moe.num_experts - per_token) * moe.experts.ffn_numel()
    return total


def first_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model output (logits / last hidden state)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        output = list(output.values())
    for item in output:
        if isinstance(item, torch.Tensor):
            return item
    raise TypeError(f"no tensor in model output of type {type(output).__name__}")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| over all elements."""
    scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
    return float((actual.double() - expected.double()).abs().max() / scale.double())


def routing_text(settings: MoESettings) -> str:
    """One layer's routing in words: "top_k (k=2)", "expert_choice (capacity 2.0)"."""
    if settings.routing == "expert_choice":
        return f"expert_choice (capacity {settings.capacity:g})"
    dropless = "" if settings.capacity is None else f", capacity {settings.capacity:g}"
    return f"{settings.routing} (k={settings.top_k}{dropless})"


@dataclass
class UpcycleReport:
    """What a conversion did; `routing`: (FFN module path, routing in words) per converted FFN."""

    ffns_found: int
    ffns_converted: int
    params_before: int
    params_after: int
    active_params_after: float
    max_relative_error: float | None = None
    routing: tuple[tuple[str, str], ...] = ()

    def rows(self) -> list[tuple[str, str]]:
        rows = [("FFNs found", str(self.ffns_found)), ("FFNs converted", str(self.ffns_converted)),
                ("parameters before", f"{self.params_before:,}"),
                ("parameters after", f"{self.params_after:,}"),
                ("active parameters per token", f"{self.active_params_after:,.0f}")]
        rows += [(f"routing of {path}", text) for path, text in self.routing]
        if self.max_relative_error is not None:
            rows.append(("max relative error vs dense", f"{self.max_relative_error:.2e}"))
        return rows
