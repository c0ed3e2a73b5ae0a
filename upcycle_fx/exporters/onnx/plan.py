"""The per-layer decision: which MoE layers the fused node can express on a target, and why not.

A layer is fused only when the node computes exactly what the layer computes (up to float
rounding); otherwise it falls back to the portable lowering with the reason recorded. The
activation's fused form is the one its record gives (`upcycle_fx.activations`), trusted only after a
numerical probe: the experts' activation module is run on a grid and compared with the reference
function of the record it claims. An activation without a record, or whose record gives no ONNX
form, takes the portable lowering, and the report says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...moe import MoE
from ...activations import describe, get_activation
from ...moe.activations import probe
from ...moe.options import fused_routing_problem
from ...report import moe_layers
from .errors import OnnxExportError
from .fused import GELU, SWIGLU, FusedForm
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
    """(activation_type, SwiGLU alpha) from the activation's record, or why it has no fused form."""
    name = experts.activation_name
    record = get_activation(name)
    form = None if record is None else record.onnx
    missing = "it has no record" if record is None else "its record gives no ONNX form"
    if experts.gated:
        if form is not None and form.swiglu_alpha is not None:
            return SWIGLU, form.swiglu_alpha
        return (f"gated {describe(name)}: the fused op gates only with SwiGLU g·sigmoid(α·g)·u "
                f"(silu or quick-GELU gates; {missing if form is None else 'its record gives no SwiGLU form'})")
    if form is None or form.activation_type is None:
        why = missing if form is None else "its record gives a SwiGLU gate only"
        return f"activation {describe(name)}: the fused op has relu, gelu, silu and SwiGLU only ({why})"
    if form.activation_type == GELU and form.gelu != target.gelu:
        return (f"{name} ({form.gelu} GELU): the {target.name} kernel's gelu is the "
                f"{target.gelu} form")
    return form.activation_type, 1.0
