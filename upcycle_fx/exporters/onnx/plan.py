"""The per-layer decision: which MoE layers the fused node can express on a target, and why not.

A layer is fused only when the node computes exactly what the layer computes (up to float
rounding); otherwise it falls back to the portable lowering with the reason recorded. The
activation is trusted by name only after a numerical probe: the experts' activation module is run
on a grid and compared with the reference function of the name it claims.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...moe import MoE
from ...moe.activations import QUICK_GELU_ALPHA, probe
from ...moe.options import fused_routing_problem
from ...report import moe_layers
from .errors import OnnxExportError
from .fused import GELU, RELU, SILU, SWIGLU, FusedForm
from .targets import Target

FUSED, PORTABLE = "fused", "portable"

@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer and how it will be lowered (`form` is None for the portable lowering)."""

    name: str
    moe: MoE
    form: FusedForm | None
    reason: str = ""   # why the layer is portable

    @property
    def lowering(self) -> str:
        return FUSED if self.form is not None else PORTABLE


def plan_layers(model: nn.Module, *, fused: bool, target: Target,
                portable_layers=()) -> list[LayerPlan]:
    """A LayerPlan for every MoE layer of `model`, in execution order."""
    layers = moe_layers(model)
    unknown = set(portable_layers) - {name for name, _ in layers}
    if unknown:
        raise OnnxExportError(f"portable_layers names no MoE layer: {sorted(unknown)}; the MoE "
                              f"layers are {[name for name, _ in layers]}")
    plans = []
    for name, moe in layers:
        if not fused:
            plans.append(LayerPlan(name, moe, None, "fused=False"))
        elif name in portable_layers:
            plans.append(LayerPlan(name, moe, None, "listed in portable_layers"))
        else:
            form = fused_form(moe, target)
            plans.append(LayerPlan(name, moe, form, "") if isinstance(form, FusedForm)
                         else LayerPlan(name, moe, None, form))
    return plans


def fused_form(moe: MoE, target: Target) -> FusedForm | str:
    """The node form that computes exactly what `moe` computes on `target`, or why there is none."""
    settings, experts = moe.settings, moe.experts
    if settings.routing != "top_k":
        return f"{settings.routing} routing: the fused op routes tokens to their top-k experts only"
    routing_problem = fused_routing_problem(settings)
    if routing_problem:
        return routing_problem
    if settings.capacity_factor is not None and settings.capacity_factor * settings.top_k < moe.num_experts:
        return (f"capacity_factor={settings.capacity_factor:g} can drop assignments "
                "(the fused op is dropless)")
    split = _splits_tied_rows(moe)
    if split:
        return split
    dtype = experts.up_proj.dtype
    if dtype not in target.dtypes:
        return f"{dtype}: the {target.name} kernel runs {', '.join(map(str, target.dtypes))}"
    problem = target.dim_problem(experts.d_model, experts.d_ff, dtype)
    if problem:
        return problem
    activation = _activation_form(experts, target)
    if isinstance(activation, str):
        return activation
    activation_type, alpha = activation
    probe_error = probe(experts.activation, experts.activation_name, dtype, experts.up_proj.device)
    if probe_error:
        return probe_error
    return FusedForm(activation_type, settings.top_k, settings.normalize_weights, alpha,
                     "tanh" if target.gelu == "tanh" else "none", settings.scoring)


def _splits_tied_rows(moe: MoE) -> str | None:
    """Fine-grained layers keep equal router rows within each virtual group (`moe.segments`): a
    top_k that is not a multiple of the group must break ties, which the fused kernels do their
    own way (CPU: highest index first), so only the portable lowering computes the same."""
    from ...moe.segments import routed_group_size

    s = moe.settings
    group = routed_group_size(getattr(s, "granularity", 1), getattr(s, "num_shared_experts", 0))
    if group == 1 or s.top_k % group == 0:
        return None
    rows = moe.router.weight.detach()
    if torch.unique(rows, dim=0).shape[0] == rows.shape[0]:
        return None   # trained apart: no ties left
    return (f"top_k={s.top_k} splits the groups of {group} equal router rows (fine-grained experts): "
            "the fused op breaks the ties in its own order")


def _activation_form(experts, target: Target) -> tuple[str, float] | str:
    name = experts.activation_name
    if experts.gated:
        gates = {"silu": 1.0, "gelu_quick": QUICK_GELU_ALPHA}
        if name in gates:
            return SWIGLU, gates[name]
        return (f"gated {name}: the fused op gates only with SwiGLU g·sigmoid(α·g)·u "
                "(silu or quick-GELU gates)")
    if name in ("relu", "silu"):
        return (RELU if name == "relu" else SILU), 1.0
    if name in ("gelu", "gelu_tanh", "gelu_fast"):
        computes = "erf" if name == "gelu" else "tanh"
        if computes == target.gelu:
            return GELU, 1.0
        return (f"{name} ({computes} GELU): the {target.name} kernel's gelu is the "
                f"{target.gelu} form")
    return f"activation {name}: the fused op has relu, gelu, silu and SwiGLU only"
