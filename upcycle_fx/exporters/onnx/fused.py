"""The fused lowering: one MoE layer -> one onnxruntime `com.microsoft::MoE` node.

During export each fused layer's forward calls the custom op `upcycle_fx::ort_moe` (opaque to
`torch.export`, so the dispatch code never reaches the graph), and `custom_translation_table`
turns each call into a `com.microsoft::MoE` node fed with the router's raw logits and the
stacked expert weights (stored `[E, out, in]`, the layout the op reads).

The op's semantics (onnxruntime's CPU source, measured in research/anchors-onnx.md §1.4):
softmax over all experts, top-k, optional renormalisation of the k weights, then
`Σ_j w_j · (fc2_e(act(fc1_e x + b1)) + b2)`. That is exactly `upcycle_fx`'s top-k routing with
or without `normalize_weights`. Gated experts use SwiGLU in the interleaved layout
(`swiglu_fusion=1`: row 2j = gate_j, row 2j+1 = up_j), the one layout both the CPU and the CUDA
kernels take; ours is concatenated `[gate; up]`, so the rows are reordered once at export.
SwiGLU computes `g·sigmoid(α·g)·(u + β)`: α=1 is silu gating, α=1.702 quick-GELU gating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ...moe.experts import up_bias_rows
from ...moe.scoring import get_scorer

# Activation attribute values of com.microsoft::MoE that we emit.
RELU, GELU, SILU, SWIGLU = "relu", "gelu", "silu", "swiglu"


@dataclass(frozen=True)
class FusedForm:
    """How one MoE layer is written as a com.microsoft::MoE node."""

    activation_type: str            # relu | gelu | silu | swiglu
    k: int
    normalize: bool
    swiglu_alpha: float = 1.0       # swiglu only: gate = g·sigmoid(alpha·g)
    gelu_approximate: str = "tanh"  # gelu only: what the target kernel computes (eager reference)
    scoring: str = "softmax"        # the node is fed the scorer's log-scores (softmax: the logits)

    def describe(self) -> str:
        if self.activation_type == SWIGLU:
            text = f"swiglu(alpha={self.swiglu_alpha:g}, interleaved), k={self.k}, normalize={int(self.normalize)}"
        else:
            flavour = "tanh" if self.gelu_approximate == "tanh" else "erf"
            name = f"gelu({flavour})" if self.activation_type == GELU else self.activation_type
            text = f"{name}, k={self.k}, normalize={int(self.normalize)}"
        return text if self.scoring == "softmax" else f"{text}, {self.scoring} scores"


def interleave_gate_up(stacked: Tensor, d_ff: int) -> Tensor:
    """[E, 2·d_ff, ...] with gate rows then up rows -> rows gate_0, up_0, gate_1, up_1, ..."""
    gate, up = stacked[:, :d_ff], stacked[:, d_ff:]
    return torch.stack([gate, up], dim=2).reshape(stacked.shape)


# --------------------------------------------------------------------------- the custom op


@torch.library.custom_op("upcycle_fx::ort_moe", mutates_args=())
def ort_moe(x: Tensor, router_logits: Tensor, fc1: Tensor, fc1_bias: Optional[Tensor], fc2: Tensor,
            fc2_bias: Optional[Tensor], k: int, activation_type: str, normalize: bool,
            swiglu_alpha: float, gelu_approximate: str) -> Tensor:
    """Eager reference of com.microsoft::MoE (tokens x: [T, D], logits: [T, E]) -> [T, D].

    Used when the lowered model runs in PyTorch (tests); the exported graph holds the node
    instead. Computes in float32 at least, returns x's dtype.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    probs = torch.softmax(router_logits.to(compute), dim=-1)
    weight, expert_idx = torch.topk(probs, k, dim=-1)
    if normalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=compute, device=x.device)
    for expert in range(fc1.shape[0]):
        token, slot = torch.where(expert_idx == expert)
        if token.numel() == 0:
            continue
        h = F.linear(x[token].to(compute), fc1[expert].to(compute),
                     None if fc1_bias is None else fc1_bias[expert].to(compute))
        h = _activation(h, activation_type, swiglu_alpha, gelu_approximate)
        y = F.linear(h, fc2[expert].to(compute), None if fc2_bias is None else fc2_bias[expert].to(compute))
        out.index_add_(0, token, y * weight[token, slot, None])
    return out.to(x.dtype)


@ort_moe.register_fake
def _(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k, activation_type, normalize, swiglu_alpha,
      gelu_approximate):
    return torch.empty_like(x)


def _activation(h: Tensor, activation_type: str, alpha: float, gelu_approximate: str) -> Tensor:
    if activation_type == RELU:
        return torch.relu(h)
    if activation_type == SILU:
        return F.silu(h)
    if activation_type == GELU:
        return F.gelu(h, approximate=gelu_approximate)
    if activation_type == SWIGLU:
        gate, up = h[:, 0::2], h[:, 1::2]
        return gate * torch.sigmoid(alpha * gate) * up
    raise ValueError(f"activation_type {activation_type!r} is not emitted by upcycle_fx")


# --------------------------------------------------------------------------- ONNX translation


def translate_ort_moe(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, k: int, activation_type: str,
                      normalize: bool, swiglu_alpha: float, gelu_approximate: str):
    """custom_translation_table entry: upcycle_fx::ort_moe -> com.microsoft::MoE.

    Inputs 0-4 are always present (onnxruntime rejects a node with fewer than 5 inputs); a
    missing fc1 bias becomes the empty name. `gelu_approximate` only documents the target.
    """
    from .schema import moe_op

    attributes = {"k": k, "activation_type": activation_type,
                  "normalize_routing_weights": int(normalize)}
    if activation_type == SWIGLU:
        attributes.update(swiglu_fusion=1, activation_alpha=float(swiglu_alpha), activation_beta=0.0)
    return moe_op()(x, router_logits, fc1, fc1_bias, fc2, fc2_bias, **attributes)


def translation_table() -> dict:
    return {torch.ops.upcycle_fx.ort_moe.default: translate_ort_moe}


# --------------------------------------------------------------------------- the layer forward


# Names of the temporary buffers that hold interleaved SwiGLU weights during export (swap.py).
PACKED_FC1, PACKED_FC1_BIAS = "onnx_fc1", "onnx_fc1_bias"


def packed_fc1(experts, form: FusedForm) -> tuple[Tensor, Tensor | None]:
    """(fc1 weights, fc1 bias) in the node's layout, computed from the experts' parameters."""
    up_bias = up_bias_rows(experts)
    if form.activation_type != SWIGLU:
        return experts.up_proj, up_bias
    bias = None if up_bias is None else interleave_gate_up(up_bias.detach(), experts.d_ff)
    return interleave_gate_up(experts.up_proj.detach(), experts.d_ff), bias


def fused_forward(moe, form: FusedForm, x: Tensor) -> Tensor:
    """What a fused MoE layer computes during export: router logits, then the custom op.

    fc1 is read from the module at call time (torch.export swaps parameters and buffers on the
    module, so a tensor captured in a closure would be baked in as a constant): the experts'
    own `up_proj` / `up_bias`, or the interleaved copies that `swap.lowered` registers as
    buffers for SwiGLU. The router runs in float32 (as `Router` does); the op takes its logits
    in the input dtype.
    """
    experts = moe.experts
    if form.activation_type == SWIGLU:
        fc1, fc1_bias = getattr(experts, PACKED_FC1), getattr(experts, PACKED_FC1_BIAS)
    else:
        fc1, fc1_bias = experts.up_proj, up_bias_rows(experts)
    tokens = x.reshape(-1, x.shape[-1])
    # softmax(log-scores) = the scores as a distribution: top-k and renormalised weights are the
    # layer's own (sigmoid: logsigmoid(logits), the scores over their sum)
    logits = get_scorer(form.scoring).log_scores(moe.router(tokens)).to(tokens.dtype)
    out = torch.ops.upcycle_fx.ort_moe(tokens, logits, fc1, fc1_bias, experts.down_proj,
                                       experts.down_bias, form.k, form.activation_type,
                                       form.normalize, form.swiglu_alpha, form.gelu_approximate)
    return out.reshape(x.shape)
