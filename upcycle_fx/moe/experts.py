"""`Experts`: E copies (or segments) of one FFN, stored as stacked [E, ...] weights in the nn.Linear layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .grouped import grouped_linear


@dataclass
class FFNWeights:
    """The dense FFN's weights in the nn.Linear layout, gate before up for gated FFNs.

    up: [F_in, D] with F_in = 2·d_ff for gated FFNs ([gate; up]) and d_ff otherwise;
    down: [D, d_ff]; biases may be None. A gated FFN with a bias on only one of its gate and up
    projections has `up_bias` [d_ff] for that half alone and `up_bias_half` 0 (gate) or 1 (up).
    """

    up: torch.Tensor
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    gated: bool
    up_bias_half: int | None = None

    @property
    def d_model(self) -> int:
        return self.down.shape[0]

    @property
    def d_ff(self) -> int:
        return self.down.shape[1]

    def numel(self) -> int:
        tensors = (self.up, self.up_bias, self.down, self.down_bias)
        return sum(t.numel() for t in tensors if t is not None)


class Experts(nn.Module):
    """E experts with stacked weights (the layout of HF v5, torchtitan and ONNX Runtime's MoE).

    up_proj: [E, F_in, D] (gated: gate rows then up rows), up_bias: [E, F_in] or None,
    down_proj: [E, D, d_ff], down_bias: [E, D] or None. Where the dense FFN had a bias on only
    its gate (or only its up) projection, `up_bias` is [E, d_ff] for that half alone and
    `up_bias_half` is 0 (or 1): the experts store no parameters the dense FFN did not have.
    `activation` is the dense FFN's own activation module (applied to the gate half for gated
    experts); `hidden_dropout` is the dropout the dense FFN applied to its hidden activations,
    kept so training behaves the same.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, gated: bool,
                 activation: nn.Module, activation_name: str = "custom", up_bias: bool = True,
                 down_bias: bool = True, hidden_dropout: float = 0.0, up_bias_half: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        up_rows = 2 * d_ff if gated else d_ff
        if up_bias_half not in ((None, 0, 1) if gated and up_bias else (None,)):
            raise ValueError(f"up_bias_half={up_bias_half!r}: only gated experts with an up bias have halves")
        bias_rows = up_rows if up_bias_half is None else d_ff
        self.num_experts, self.d_model, self.d_ff, self.gated = num_experts, d_model, d_ff, gated
        self.up_bias_half = up_bias_half
        self.up_proj = nn.Parameter(torch.empty(num_experts, up_rows, d_model, **factory))
        self.up_bias = nn.Parameter(torch.empty(num_experts, bias_rows, **factory)) if up_bias else None
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff, **factory))
        self.down_bias = nn.Parameter(torch.empty(num_experts, d_model, **factory)) if down_bias else None
        self.activation = activation
        self.activation_name = activation_name  # e.g. "silu", "gelu_tanh": for reports and ONNX
        self.hidden_dropout = float(hidden_dropout)

    @classmethod
    def tile(cls, ffn: FFNWeights, num_experts: int, *, activation: nn.Module,
             activation_name: str = "custom", hidden_dropout: float = 0.0, noise_std: float = 0.0,
             generator: torch.Generator | None = None) -> "Experts":
        """E exact copies of `ffn` (plus N(0, noise_std) on the weight matrices if asked)."""
        units = torch.arange(ffn.d_ff, device=ffn.up.device).expand(num_experts, ffn.d_ff)
        experts = cls.from_units(ffn, units, activation=activation, activation_name=activation_name,
                                 hidden_dropout=hidden_dropout)
        if noise_std > 0:
            experts.add_noise(noise_std, generator)
        return experts

    @classmethod
    def from_units(cls, ffn: FFNWeights, units: torch.Tensor, *, down_scale: float = 1.0,
                   activation: nn.Module, activation_name: str = "custom",
                   hidden_dropout: float = 0.0) -> "Experts":
        """Expert i made of the dense hidden units `units[i]` ([E, width] indices): their rows of
        the up (and gate) projection and bias, their columns of the down projection times
        `down_scale`, and the whole down bias (see `segments.py` for why that keeps the function)."""
        num_experts, width = units.shape
        experts = cls(num_experts, ffn.d_model, width, gated=ffn.gated, activation=activation,
                      activation_name=activation_name,
                      up_bias=ffn.up_bias is not None, down_bias=ffn.down_bias is not None,
                      up_bias_half=ffn.up_bias_half, hidden_dropout=hidden_dropout,
                      device=ffn.up.device, dtype=ffn.up.dtype)
        units = units.to(ffn.up.device)
        rows = torch.cat([units, units + ffn.d_ff], dim=1) if ffn.gated else units
        bias_rows = units if ffn.up_bias_half is not None else rows
        up, up_bias, down = ffn.up.detach(), ffn.up_bias, ffn.down.detach()
        with torch.no_grad():
            for i in range(num_experts):  # one expert at a time: no [E, ...] temporary
                experts.up_proj[i].copy_(up[rows[i]])
                if experts.up_bias is not None:
                    experts.up_bias[i].copy_(up_bias.detach()[bias_rows[i]])
                experts.down_proj[i].copy_(down[:, units[i]])
            if down_scale != 1.0:
                experts.down_proj.mul_(down_scale)
            if experts.down_bias is not None:
                experts.down_bias.copy_(ffn.down_bias.detach().expand_as(experts.down_bias))
        return experts

    def add_noise(self, std: float, generator: torch.Generator | None = None) -> None:
        """N(0, std²) added to every weight matrix (not the biases)."""
        with torch.no_grad():
            for stacked in (self.up_proj, self.down_proj):
                noise = torch.randn(stacked.shape, generator=generator, dtype=torch.float32)
                stacked.add_(noise.mul_(std).to(stacked))

    def reinitialize(self, generator: torch.Generator | None = None) -> None:
        """Random experts (the paper's 'from scratch' ablation): every stacked weight matrix drawn
        N(0, σ²) with σ its current std, biases zeroed."""
        with torch.no_grad():
            for stacked in (self.up_proj, self.down_proj):
                std = float(stacked.float().std())
                noise = torch.randn(stacked.shape, generator=generator, dtype=torch.float32)
                stacked.copy_(noise.mul_(std).to(stacked))
            for bias in (self.up_bias, self.down_bias):
                if bias is not None:
                    bias.zero_()

    def ffn_numel(self) -> int:
        """Parameters of one expert (= of the dense FFN it was copied from, or of its segment)."""
        return sum(p.numel() for p in self._stacked()) // self.num_experts

    def _stacked(self) -> list[torch.Tensor]:
        return [p for p in (self.up_proj, self.up_bias, self.down_proj, self.down_bias) if p is not None]

    def hidden(self, up_out: torch.Tensor) -> torch.Tensor:
        """Activation (and gating) of the up projection's output, then hidden dropout."""
        if self.gated:
            gate, up = up_out.split(self.d_ff, dim=-1)
            hidden = self.activation(gate) * up
        else:
            hidden = self.activation(up_out)
        return F.dropout(hidden, self.hidden_dropout, self.training) if self.hidden_dropout else hidden

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert` applied to rows x: [n, D] -> [n, D] (the reference path)."""
        up_bias = up_bias_rows(self)
        up_bias = None if up_bias is None else up_bias[expert]
        down_bias = None if self.down_bias is None else self.down_bias[expert]
        hidden = self.hidden(F.linear(x, self.up_proj[expert], up_bias))
        return F.linear(hidden, self.down_proj[expert], down_bias)

    def forward_grouped(self, x: torch.Tensor, expert_idx: torch.Tensor, offsets: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
        """Rows x: [N, D] sorted by expert (expert_idx: [N]) -> [N, D], one grouped matmul each way.

        Biases are added as `one_hot(expert) @ bias`, a skinny matmul, rather than a gather
        `bias[expert]`: the gather's backward scatters N rows into E bias rows with atomics, which
        serialise when few experts get many rows (8 experts: 4x slower backward at T=16k on an H100).
        """
        up_out = grouped_linear(x, self.up_proj, offsets, counts)
        membership = None
        if self.up_bias is not None or self.down_bias is not None:
            membership = F.one_hot(expert_idx, self.num_experts).to(x.dtype)
        if self.up_bias is not None:
            up_out = up_out + membership @ up_bias_rows(self)
        out = grouped_linear(self.hidden(up_out), self.down_proj, offsets, counts)
        if self.down_bias is not None:
            out = out + membership @ self.down_bias
        return out

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Slots x: [E, C, D] (C rows for each expert) -> [E, C, D], one bmm each way."""
        up_out = torch.bmm(x, self.up_proj.transpose(1, 2))
        if self.up_bias is not None:
            up_out = up_out + up_bias_rows(self)[:, None]
        out = torch.bmm(self.hidden(up_out), self.down_proj.transpose(1, 2))
        if self.down_bias is not None:
            out = out + self.down_bias[:, None]
        return out

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "dense"
        up_bias = ("gate", "up")[self.up_bias_half] if self.up_bias_half is not None else self.up_bias is not None
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
                f"{kind} {self.activation_name}, bias={up_bias}/{self.down_bias is not None}, "
                f"hidden_dropout={self.hidden_dropout}")


def up_bias_rows(experts) -> torch.Tensor | None:
    """The up projection's bias over all its rows, [E, F_in], or None. A bias on only the gate (or
    up) half is stored alone and zero-padded here (differentiably), for the forward paths."""
    bias, half = experts.up_bias, getattr(experts, "up_bias_half", None)
    if bias is None or half is None:
        return bias
    return F.pad(bias, (0, experts.d_ff) if half == 0 else (experts.d_ff, 0))
