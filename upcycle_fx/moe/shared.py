"""`SharedExperts`: the always-active experts of an MoE layer (DeepSeekMoE, Qwen2-MoE).

n shared experts of width w are one FFN of n·w hidden units (their outputs add up), stored as an
`Experts` of one expert so that every forward path and exporter reads the same stacked layout.
With `gated=True` the output is multiplied by `sigmoid(gate(x))`, a bias-free linear map
d_model -> 1 (Qwen2-MoE's `shared_expert_gate`), computed in the model's dtype as Qwen2-MoE does;
it starts at weight 0, a factor of 1/2 (see `segments.py` for how the rewrite compensates).
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import Experts, FFNWeights


class SharedExperts(nn.Module):
    """`.experts` (an `Experts` with one expert of all the shared hidden units) and `.gate` or None."""

    def __init__(self, experts: Experts, num_shared: int, *, gated: bool) -> None:
        super().__init__()
        if experts.num_experts != 1:
            raise ValueError("shared experts are stored as one FFN (an Experts of one expert)")
        self.experts = experts
        self.num_shared = num_shared
        self.gate = None
        if gated:
            self.gate = nn.Linear(experts.d_model, 1, bias=False, device=experts.up_proj.device,
                                  dtype=experts.up_proj.dtype)
            nn.init.zeros_(self.gate.weight)

    @classmethod
    def build(cls, ffn: FFNWeights, units: torch.Tensor, num_shared: int, *, scale: float, gated: bool,
              activation: nn.Module, activation_name: str, hidden_dropout: float) -> "SharedExperts":
        experts = Experts.from_units(ffn, units.unsqueeze(0), down_scale=scale, activation=activation,
                                     activation_name=activation_name, hidden_dropout=hidden_dropout)
        if experts.down_bias is not None:  # the routed experts already add the whole down bias
            with torch.no_grad():
                experts.down_bias.zero_()
        return cls(experts, num_shared, gated=gated)

    @property
    def d_ff(self) -> int:
        """All shared hidden units (n experts' worth)."""
        return self.experts.d_ff

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens [T, D] -> [T, D]."""
        out = self.experts.forward_expert(0, tokens)
        if self.gate is not None:
            out = torch.sigmoid(self.gate(tokens)) * out
        return out

    def extra_repr(self) -> str:
        return f"num_shared={self.num_shared}, gated={self.gate is not None}"
