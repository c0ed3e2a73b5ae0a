"""The public entry points: `rewrite`, `upcycle`, `find_mlps`, `aux_loss`."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import integrations
from .capture import LeafPolicy, resolve_inputs
from .config import PatternSpec, UpcycleConfig
from .errors import NoMLPFoundError
from .passes import MLPList, MLPMatch, select_mlps, upcycle_matches
from .passes.verify import preserves_function, verify_upcycled
from .passes import find_mlps as _find_mlps
from .report import count_parameters, moe_layers


@dataclass
class UpcycleResult:
    """The upcycled model and what was done to get it."""

    model: nn.Module
    mlps: MLPList                      # every FFN found, in execution order
    converted: list[MLPMatch]          # the ones that became MoE layers
    config: UpcycleConfig
    params_before: int = 0
    verified_error: float | None = None  # dense-vs-upcycled error on the example inputs


def _leaf_policy(leaf_modules) -> LeafPolicy | None:
    if not leaf_modules:
        return None
    classes = tuple(x for x in leaf_modules if isinstance(x, type))
    names = tuple(x for x in leaf_modules if isinstance(x, str))
    return LeafPolicy(leaf_classes=classes, leaf_names=names)


def find_mlps(model: nn.Module, example_inputs: Any = None, *, leaf_modules=()) -> MLPList:
    """Dry run: the FFNs found, in execution order, with kind, d_model, d_ff, activation and
    module paths. Nothing is rewritten. `.near_misses` / `.capture_failures` say what was
    rejected and why."""
    return _find_mlps(model, example_inputs, _leaf_policy(leaf_modules))


def upcycle(model: nn.Module, config: UpcycleConfig | None = None, *, example_inputs: Any = None,
            inplace: bool = False, leaf_modules=(), verify: bool = True) -> UpcycleResult:
    """Find, select and convert FFNs per `config`; returns the model and the record of it.

    With `verify` (default), a function-preserving configuration and example inputs at hand
    (yours, or a Hugging Face model's own), the upcycled model is run against the dense one and
    a difference beyond rounding raises `RewriteError` instead of returning a wrong model.
    """
    config = config or UpcycleConfig()
    mlps = find_mlps(model, example_inputs, leaf_modules=leaf_modules)
    if not mlps:
        raise NoMLPFoundError(_nothing_found(model, mlps))
    chosen = select_mlps(mlps, config.pattern)
    params_before = count_parameters(model)
    inputs = resolve_inputs(model, example_inputs) if verify and preserves_function(config) else None
    reference = copy.deepcopy(model) if inplace and inputs is not None else model
    target = model if inplace else copy.deepcopy(model)
    upcycled = upcycle_matches(target, chosen, config)
    error = None if inputs is None else verify_upcycled(reference, upcycled, inputs)
    integrations.attach(upcycled)  # aux losses in outputs.loss; what save_pretrained must write
    return UpcycleResult(upcycled, mlps, chosen, config, params_before, error)


def rewrite(model: nn.Module, pattern: PatternSpec = "every_other_mlp", *, num_experts: int = 8,
            top_k: int = 2, routing: str = "top_k", capacity_factor: float | None = None,
            normalize_weights: bool = True, router_init_std: float = 0.02,
            expert_noise_std: float = 0.0, expert_init: str = "copy", aux_loss_weight: float = 0.01,
            z_loss_weight: float = 0.0, example_inputs: Any = None, inplace: bool = False,
            seed: int | None = None, leaf_modules=(), verify: bool = True) -> nn.Module:
    """Turn the selected FFNs of `model` into `upcycle_fx.MoE` layers (see DESIGN §3).

    With `normalize_weights=True` (default) and no noise, the result computes exactly what
    `model` computes. The input is left untouched unless `inplace=True`.
    """
    config = UpcycleConfig(pattern=pattern, num_experts=num_experts, top_k=top_k, routing=routing,
                           capacity_factor=capacity_factor, normalize_weights=normalize_weights,
                           router_init_std=router_init_std, expert_noise_std=expert_noise_std,
                           expert_init=expert_init,
                           aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight, seed=seed)
    return upcycle(model, config, example_inputs=example_inputs, inplace=inplace,
                   leaf_modules=leaf_modules, verify=verify).model


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Weighted sum of the MoE layers' auxiliary losses (load balancing + z-loss) of the last
    forward; add it to the task loss before `backward()`."""
    losses = [m.last_aux_loss for _, m in moe_layers(model) if m.last_aux_loss is not None]
    if not losses:
        device = next(iter(model.parameters()), torch.empty(0)).device
        return torch.zeros((), device=device)
    return torch.stack([l.float() for l in losses]).sum()


def _nothing_found(model: nn.Module, mlps: MLPList) -> str:
    lines = [f"{type(model).__name__}: no FFN (Linear -> activation -> Linear, gated or fused "
             "gated) was found."]
    for miss in mlps.near_misses[:5]:
        lines.append(f"  rejected {miss.pattern} candidate in {miss.region or '<model>'}: {miss.reason}")
    for path, reason in mlps.capture_failures[:5]:
        lines.append(f"  could not capture {path or '<model>'}: {reason}")
    lines.append("If the model has an FFN, pass example_inputs= so it can be captured, mark "
                 "opaque modules with leaf_modules=, or register its activation with "
                 "upcycle_fx.register_activation.")
    return "\n".join(lines)
