"""The router: a bias-free linear map d_model -> E, always evaluated in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Linear):
    """Linear d_model -> num_experts without bias, initialised N(0, std), computed in float32.

    Routing decisions are sensitive to rounding (ST-MoE), so the logits are computed in float32
    whatever the model's dtype.
    """

    def __init__(self, d_model: int, num_experts: int, *, init_std: float = 0.02,
                 generator: torch.Generator | None = None, device=None, dtype=None) -> None:
        super().__init__(d_model, num_experts, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            noise = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32)
            self.weight.copy_(noise.mul_(init_std).to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())
