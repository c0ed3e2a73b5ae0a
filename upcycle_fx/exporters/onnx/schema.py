"""The `com.microsoft::MoE` operator as the ONNX tooling needs to see it.

The `onnx` package has no schemas for onnxruntime's contrib ops, and torch's exporter needs an
`onnx.defs.OpSchema` to turn a call into a node, so we declare the operator by hand, as
onnxruntime 1.31 defines it (research/anchors-onnx.md §1.1). The attributes are declared
optional WITHOUT defaults: with defaults the exporter writes every attribute, and a runtime older
than the schema rejects attributes it does not know (1.31 rejects 1.32's
`swiglu_limit_after_activation`). Only the attributes a node sets are written.

Built lazily (it imports onnx and onnxscript, which `import upcycle_fx` does not need).
"""

from __future__ import annotations

import functools

from .targets import MSFT_DOMAIN

# (name, optional) in onnxruntime's input order (fixed since 1.18).
MOE_INPUTS = (
    ("input", False), ("router_probs", False),
    ("fc1_experts_weights", False), ("fc1_experts_bias", True),
    ("fc2_experts_weights", False), ("fc2_experts_bias", True),
    ("fc3_experts_weights", True), ("fc3_experts_bias", True),
)
# (name, onnx attribute type name); all optional, no defaults (see the module docstring).
MOE_ATTRIBUTES = (
    ("k", "INT"), ("activation_type", "STRING"), ("normalize_routing_weights", "INT"),
    ("use_sparse_mixer", "INT"), ("swiglu_fusion", "INT"), ("activation_alpha", "FLOAT"),
    ("activation_beta", "FLOAT"), ("swiglu_limit", "FLOAT"),
)


@functools.lru_cache(maxsize=None)
def moe_schema():
    """`onnx.defs.OpSchema` of com.microsoft::MoE (version 1)."""
    from onnx.defs import OpSchema

    optional, single = OpSchema.FormalParameterOption.Optional, OpSchema.FormalParameterOption.Single
    inputs = [OpSchema.FormalParameter(name, "T", "", param_option=optional if opt else single)
              for name, opt in MOE_INPUTS]
    attributes = [OpSchema.Attribute(name, getattr(OpSchema.AttrType, kind), "", required=False)
                  for name, kind in MOE_ATTRIBUTES]
    return OpSchema(
        "MoE", MSFT_DOMAIN, 1, "Mixture of experts (onnxruntime contrib op).",
        inputs=inputs, outputs=[OpSchema.FormalParameter("output", "T", "")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=attributes,
    )


@functools.lru_cache(maxsize=None)
def moe_op():
    """An onnxscript `Op` that emits com.microsoft::MoE nodes (for custom_translation_table)."""
    import onnxscript

    return onnxscript.values.Op(onnxscript.values.Opset(MSFT_DOMAIN, 1), "MoE", moe_schema())
