"""Install the chosen lowering into each MoE layer for the duration of an export, then undo it.

The MoE module's own forward records statistics as attributes (losses, loads) and dispatches
with data-dependent code; neither belongs in an inference graph. During export each layer's
`forward` is replaced by a pure function (fused.fused_forward or portable.portable_forward,
plus the layer's shared experts in standard operators where it has them),
SwiGLU layers get their interleaved fc1 as temporary non-persistent buffers (so they become
named initializers), and the model is in eval mode. Everything is restored afterwards, also when
the export fails: the user's model is not changed.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

from torch import nn

from .fused import PACKED_FC1, PACKED_FC1_BIAS, SWIGLU, fused_forward, packed_fc1
from .plan import LayerPlan
from .portable import portable_forward


@contextmanager
def lowered(model: nn.Module, plans: list[LayerPlan]):
    """Within the block, `model` is in eval mode and each planned MoE runs its lowering.

    Yields the set of layer names whose lowering actually ran (filled in as the model runs).
    """
    modes = {module: module.training for module in model.modules()}
    reached: set[str] = set()
    undo = []
    try:
        model.eval()
        for plan in plans:
            undo.append(_install(plan, reached))
        yield reached
    finally:
        for restore in reversed(undo):
            restore()
        for module, training in modes.items():
            module.training = training


def _install(plan: LayerPlan, reached: set[str]):
    moe, experts = plan.moe, plan.moe.experts
    buffers = {}
    if plan.form is None:
        lowering = functools.partial(portable_forward, moe)
    else:
        if plan.form.activation_type == SWIGLU:
            fc1, fc1_bias = packed_fc1(experts, plan.form)
            buffers = {PACKED_FC1: fc1, PACKED_FC1_BIAS: fc1_bias}
            for name, tensor in buffers.items():
                experts.register_buffer(name, tensor, persistent=False)
        lowering = functools.partial(fused_forward, moe, plan.form)

    def forward(x):
        reached.add(plan.name)
        out = lowering(x)
        if moe.shared is None:
            return out
        # shared experts run on every token: standard MatMuls (and Sigmoid gate) beside either lowering
        return out + moe.shared(x.reshape(-1, x.shape[-1])).reshape(x.shape)

    moe.forward = forward

    def restore():
        del moe.forward
        for name in buffers:
            del experts._buffers[name]

    return restore
