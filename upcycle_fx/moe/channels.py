"""`ChannelsMoE`: an MoE for an FFN whose d_model is not the last dim of its input.

The MoE routes tokens laid out [..., d_model]. An FFN of 1x1 convolutions reads [B, C, T] (the
channels second to last), so in its place the MoE runs between two transposes.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import MoE


class ChannelsMoE(nn.Module):
    """Runs `moe` on `x.transpose(channel_dim, -1)` and transposes the result back."""

    def __init__(self, moe: MoE, channel_dim: int) -> None:
        super().__init__()
        self.moe, self.channel_dim = moe, channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x.transpose(self.channel_dim, -1)).transpose(self.channel_dim, -1)

    def extra_repr(self) -> str:
        return f"channel_dim={self.channel_dim}"


def on_channels(moe: MoE, channel_dim: int) -> nn.Module:
    """`moe` itself for an FFN on the last dim, else the MoE wrapped for its layout."""
    return moe if channel_dim == -1 else ChannelsMoE(moe, channel_dim)
