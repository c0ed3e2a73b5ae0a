"""Refuse inputs that are already Mixture-of-Experts models, before anything is captured.

Upcycling turns dense FFNs into MoE layers. An MoE model's experts are FFNs too, and the
patterns would happily match them (Qwen2-MoE's shared expert became an MoE inside the MoE) or
trip over the routing code. Such models are recognised from their config (expert counts) and
their module classes, and refused with what they are and what to do instead.
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import AlreadyMoEError

EXPERT_COUNT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
MOE_CLASS_NAME = re.compile(r"(SparseMoeBlock|SparseMoE|MoeBlock|MoEBlock|MoE|Moe|MoELayer|Experts)$")


def _expert_count_fields(config: object, prefix: str = "config") -> list[str]:
    """`config.num_local_experts=8`-style fields with a positive count, nested configs too."""
    found = []
    for name, value in vars(config).items():
        if name in EXPERT_COUNT_FIELDS and isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append(f"{prefix}.{name}={value}")
        elif hasattr(value, "__dict__") and hasattr(value, "to_dict") and value is not config:
            found += _expert_count_fields(value, f"{prefix}.{name}")
    return found


def moe_evidence(model: nn.Module) -> list[str]:
    """Why `model` looks like an MoE model (empty when it does not)."""
    from ..moe import MoE

    evidence = []
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "__dict__"):
        evidence += _expert_count_fields(config)
    blocks = [(path or "<model>", type(m).__name__) for path, m in model.named_modules()
              if isinstance(m, MoE) or MOE_CLASS_NAME.search(type(m).__name__)]
    outermost = [(p, c) for p, c in blocks if not any(p.startswith(q + ".") for q, _ in blocks
                                                        if q != "<model>" and q != p)]
    if outermost:
        shown = ", ".join(f"{p} ({c})" for p, c in outermost[:3])
        more = f" and {len(outermost) - 3} more" if len(outermost) > 3 else ""
        evidence.append(f"MoE modules at {shown}{more}")
    return evidence


def refuse_moe_models(model: nn.Module) -> None:
    """AlreadyMoEError if `model` already routes tokens to experts."""
    evidence = moe_evidence(model)
    if evidence:
        raise AlreadyMoEError(
            f"{type(model).__name__} is already a Mixture-of-Experts model ({'; '.join(evidence)}). "
            "upcycle_fx converts dense FFNs; an MoE model's experts and shared experts must not be "
            "upcycled again. Upcycle the dense model it came from instead, with every FFN you "
            "want converted in one pattern= (see upcycle_fx.find_mlps on the dense model), "
            "or train this model as it is.")
