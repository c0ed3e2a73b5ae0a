"""The public entry points: `rewrite`, `upcycle`, `find_mlps`, `aux_loss`, `moe_layers`.

Each checks its arguments before any work (no tracing, copying or allocation on bad input),
and leaves the input model as it found it (see `capture.snapshot`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import integrations
from .capture import LeafPolicy, resolve_inputs
from .capture.inputs import check_example_inputs, synthesize_inputs
from .capture.snapshot import left_as_found
from .config import PatternSpec, UpcycleConfig, check_bool
from .errors import NoMLPFoundError, UpcycleConfigError
from .passes import MLPList, MLPMatch, select_mlps, upcycle_matches
from .passes.already_moe import refuse_moe_models
from .passes.decisions import decide, nothing_found_message
from .passes.stack_routing import check_routing
from .passes.upcycle import check_layouts
from .passes.verify import preserves_function, run_upcycled, verify_upcycled
from .passes import find_mlps as _find_mlps
from .report import count_parameters
from .report import moe_layers as _moe_layers


@dataclass
class UpcycleResult:
    """The upcycled model and what was done to get it."""

    model: nn.Module
    mlps: MLPList                      # every FFN found, in execution order
    converted: list[MLPMatch]          # the ones that became MoE layers
    config: UpcycleConfig
    params_before: int = 0
    verified_error: float | None = None  # dense-vs-upcycled error on the example inputs
    unverified_reason: str | None = None  # why it was not verified (None when it was)


def _check_model(model: object, function: str) -> None:
    if not isinstance(model, nn.Module):
        raise UpcycleConfigError(f"{function}(model=...) takes a torch.nn.Module; got a "
                                 f"{type(model).__name__}.")


def _leaf_policy(leaf_modules) -> LeafPolicy | None:
    """`leaf_modules=`: module classes and/or qualified module names kept as single nodes."""
    if isinstance(leaf_modules, (str, type)) or not isinstance(leaf_modules, (list, tuple, set, frozenset)):
        raise UpcycleConfigError(f"leaf_modules={leaf_modules!r} must be a list or tuple of module "
                                 "classes and/or qualified module names.")
    bad = [x for x in leaf_modules
           if not isinstance(x, str) and not (isinstance(x, type) and issubclass(x, nn.Module))]
    if bad:
        raise UpcycleConfigError(f"leaf_modules entries must be nn.Module subclasses or module "
                                 f"names (str); got {bad[:3]!r}.")
    if not leaf_modules:
        return None
    classes = tuple(x for x in leaf_modules if isinstance(x, type))
    names = tuple(x for x in leaf_modules if isinstance(x, str))
    return LeafPolicy(leaf_classes=classes, leaf_names=names)


def find_mlps(model: nn.Module, example_inputs: Any = None, *, leaf_modules=(),
              pattern: PatternSpec = "every_other_mlp") -> MLPList:
    """Dry run: the FFNs found, in execution order, with kind, d_model, d_ff, activation and
    module paths. Nothing is rewritten. `.decisions` (and `.explain()`) say for every candidate
    whether `pattern` selects it, leaves it, or why it is rejected; `.near_misses` /
    `.capture_failures` are the raw diagnostics. MoE models are refused (`AlreadyMoEError`)."""
    _check_model(model, "find_mlps")
    check_example_inputs(example_inputs)
    policy = _leaf_policy(leaf_modules)
    UpcycleConfig(pattern=pattern)  # the pattern checked as rewrite checks it, before any work
    refuse_moe_models(model)
    with left_as_found(model):
        mlps = _find_mlps(model, example_inputs, policy)
        mlps.decisions = decide(model, mlps, pattern)
    return mlps


def upcycle(model: nn.Module, config: UpcycleConfig | None = None, *, example_inputs: Any = None,
            inplace: bool = False, leaf_modules=(), verify: bool = True) -> UpcycleResult:
    """Find, select and convert FFNs per `config`; returns the model and the record of it.

    With `verify` (default) and a function-preserving configuration, the upcycled model is run
    against the dense one on your example inputs, a Hugging Face model's own, or inputs built
    from the model's first layer; a difference beyond the dtype's tolerance raises
    `RewriteError` naming the FFNs responsible, instead of returning a wrong model.
    """
    _check_model(model, "upcycle")
    if config is not None and not isinstance(config, UpcycleConfig):
        raise UpcycleConfigError(f"config={config!r} must be an upcycle_fx.UpcycleConfig or None.")
    check_bool("inplace", inplace)
    check_bool("verify", verify)
    config = config or UpcycleConfig()
    mlps = find_mlps(model, example_inputs, leaf_modules=leaf_modules, pattern=config.pattern)
    if not mlps:
        raise NoMLPFoundError(nothing_found_message(model, mlps))
    chosen = select_mlps(mlps, config.pattern)
    check_routing(model, mlps, chosen, config)
    check_layouts(chosen, config)
    _check_memory(model, chosen, config, inplace)
    params_before = count_parameters(model)
    inputs, unverified, preserves = None, None, preserves_function(config)
    if not verify:
        unverified = "verify=False"
    else:
        inputs = resolve_inputs(model, example_inputs) or synthesize_inputs(model, mlps.capture)
        if inputs is None:
            unverified = ("no example inputs: pass example_inputs= to have the upcycled model "
                          "checked against the dense one")
        elif not preserves:
            unverified = ("the configuration changes the function by design (the upcycled model "
                          "was run once on the example inputs)")
    compare = inputs is not None and preserves
    reference = copy.deepcopy(model) if inplace and compare else model
    target = model if inplace else copy.deepcopy(model)
    upcycled = upcycle_matches(target, chosen, config)
    error = None
    if compare:
        error = verify_upcycled(reference, upcycled, inputs,
                                convert_one=lambda m: upcycle_matches(copy.deepcopy(reference), [m], config),
                                converted=chosen)
    elif inputs is not None:
        with left_as_found(upcycled):
            run_upcycled(upcycled, inputs)
    integrations.attach(upcycled)  # aux losses in outputs.loss; what save_pretrained must write
    return UpcycleResult(upcycled, mlps, chosen, config, params_before, error, unverified)


def rewrite(model: nn.Module, pattern: PatternSpec = "every_other_mlp", *, num_experts: int = 8,
            top_k: int = 2, routing: str = "top_k", capacity_factor: float | None = None,
            normalize_weights: bool = True, router_init_std: float = 0.02,
            expert_noise_std: float = 0.0, expert_init: str = "copy", aux_loss_weight: float = 0.01,
            z_loss_weight: float = 0.0, scoring: str = "softmax", balancing: str = "loss",
            bias_update_speed: float = 0.001, balance_scope: str = "micro_batch",
            routed_scaling_factor: float = 1.0, weight_scaling: bool = False,
            example_inputs: Any = None, inplace: bool = False,
            seed: int | None = None, leaf_modules=(), verify: bool = True, drop_ratio: float | None = None,
            granularity: int = 1, num_shared_experts: int = 0, shared_expert_gate: bool = False) -> nn.Module:
    """Turn the selected FFNs of `model` into `upcycle_fx.MoE` layers (see DESIGN §3).

    With `normalize_weights=True` (default) and no noise, the result computes exactly what
    `model` computes. The input is left untouched unless `inplace=True`. Fine-grained and
    shared experts, Drop-Upcycling and the routing options (`scoring`, `balancing`,
    `bias_update_speed`, `balance_scope`, `routed_scaling_factor`, `weight_scaling`): see
    `UpcycleConfig`.
    """
    _check_model(model, "rewrite")
    config = UpcycleConfig(pattern=pattern, num_experts=num_experts, top_k=top_k, routing=routing,
                           capacity_factor=capacity_factor, normalize_weights=normalize_weights,
                           router_init_std=router_init_std, expert_noise_std=expert_noise_std,
                           expert_init=expert_init, drop_ratio=drop_ratio, granularity=granularity,
                           num_shared_experts=num_shared_experts, shared_expert_gate=shared_expert_gate,
                           aux_loss_weight=aux_loss_weight, z_loss_weight=z_loss_weight,
                           scoring=scoring, balancing=balancing, bias_update_speed=bias_update_speed,
                           balance_scope=balance_scope, routed_scaling_factor=routed_scaling_factor,
                           weight_scaling=weight_scaling, seed=seed)
    return upcycle(model, config, example_inputs=example_inputs, inplace=inplace,
                   leaf_modules=leaf_modules, verify=verify).model


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """[(qualified name, MoE), ...] in the execution order of the FFNs they replaced."""
    _check_model(model, "moe_layers")
    return _moe_layers(model)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """Weighted sum of the MoE layers' auxiliary losses (load balancing + z-loss) of the last
    forward; add it to the task loss before `backward()`."""
    _check_model(model, "aux_loss")
    losses = [m.last_aux_loss for _, m in _moe_layers(model) if m.last_aux_loss is not None]
    if not losses:
        device = next(iter(model.parameters()), torch.empty(0)).device
        return torch.zeros((), device=device)
    return torch.stack([l.float() for l in losses]).sum()


def _check_memory(model: nn.Module, chosen: list[MLPMatch], config: UpcycleConfig,
                  inplace: bool) -> None:
    """UpcycleConfigError before allocating when the upcycled model cannot fit in the memory of
    the device holding it (total memory: a bound that never refuses what could fit)."""
    weight = next(iter(model.parameters()), None)
    if weight is None or weight.device.type == "meta":
        return
    itemsize = weight.element_size()
    copies = (config.num_experts + config.num_shared_experts) / config.granularity  # FFNs' worth
    needed = sum((copies - 1) * m.num_parameters + config.num_experts * m.d_model
                 for m in chosen) * itemsize
    if not inplace:
        needed += count_parameters(model) * itemsize
    if weight.device.type == "cuda":
        available = torch.cuda.get_device_properties(weight.device).total_memory
    elif hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    if needed > available:
        raise UpcycleConfigError(
            f"num_experts={config.num_experts} over {len(chosen)} FFNs needs about "
            f"{needed / 2**30:,.1f} GiB on {weight.device}, which has {available / 2**30:,.1f} GiB "
            "in all; lower num_experts or convert fewer FFNs (pattern=).")
