"""The router: a bias-free linear map d_model -> E, evaluated in float32 (float64 models: float64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_LIMIT = 1e4  # |logit| beyond which softmax is saturated anyway; keeps extreme inputs finite


class Router(nn.Linear):
    """Linear d_model -> num_experts without bias, initialised N(0, std).

    The weight is stored in the model's dtype (what `model.to(dtype)` and the stock Hugging Face
    MoE formats give it); the logits are computed in float32 whatever that dtype, since routing
    decisions are sensitive to rounding (ST-MoE), and in float64 for float64 models. Logits are
    clamped to ±LOGIT_LIMIT (NaN to 0): an extreme input (bf16 activations near 1e38) whose
    logits overflow to ±inf would otherwise make the routing NaN where the dense FFN is finite.
    """

    def __init__(self, d_model: int, num_experts: int, *, init_std: float = 0.02,
                 generator: torch.Generator | None = None, device=None, dtype=None) -> None:
        super().__init__(d_model, num_experts, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            noise = torch.randn(self.weight.shape, generator=generator, dtype=torch.float32)
            self.weight.copy_(noise.mul_(init_std).to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(dtype), self.weight.to(dtype))
        return logits.nan_to_num(0.0, LOGIT_LIMIT, -LOGIT_LIMIT).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
