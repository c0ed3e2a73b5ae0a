"""Validation of the routing options of `UpcycleConfig` (scorer, balancer, scope, weight scaling),
and what they mean for function preservation and for the fused or stock formats.

Every check runs when the config is built, before any model is touched; a combination that
cannot work is an `UpcycleConfigError` saying why and what to choose instead.
"""

from __future__ import annotations

import math
import numbers

from ..errors import UpcycleConfigError
from .balancing import get_balancer
from .scoring import SCORERS, get_scorer

BALANCE_SCOPES = ("micro_batch", "global_batch")


def _routings(config) -> tuple:
    """The routing names in force (one, or one per stack where the config maps stacks to them)."""
    routing = config.routing
    return tuple(routing.values()) if isinstance(routing, dict) else (routing,)


def _positive(name: str, value: object, hint: str) -> None:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not value > 0):
        raise UpcycleConfigError(f"{name}={value!r} must be a finite number > 0: {hint}.")


def check_routing_options(config) -> None:
    """UpcycleConfigError for an unknown scorer, balancer or scope, or an impossible combination."""
    if not isinstance(config.scoring, str) or config.scoring not in SCORERS:
        get_scorer(config.scoring)  # raises, naming the registered scorers
    balancer = get_balancer(config.balancing)
    if config.balance_scope not in BALANCE_SCOPES:
        raise UpcycleConfigError(f"balance_scope={config.balance_scope!r} is unknown; choose one of "
                                 f"{BALANCE_SCOPES} ('global_batch': the load-balancing loss counts "
                                 "expert loads over all micro-batches and ranks of an optimizer step).")
    expert_choice = "expert_choice" in _routings(config)
    if balancer.uses_bias:
        _positive("bias_update_speed", config.bias_update_speed,
                  "the step of the per-expert bias update (DeepSeek-V3: 0.001)")
        if expert_choice:
            raise UpcycleConfigError(
                f"balancing={config.balancing!r} biases which experts a token chooses, but "
                "expert_choice routing lets experts choose tokens (balanced by construction); "
                "use routing='top_k' or balancing='loss'.")
    else:
        speed = config.bias_update_speed
        if (isinstance(speed, bool) or not isinstance(speed, numbers.Real) or not math.isfinite(speed)
                or speed < 0):
            raise UpcycleConfigError(f"bias_update_speed={speed!r} must be a finite number >= 0 "
                                     "(it moves the selection bias of balancing='bias').")
    if config.balance_scope == "global_batch" and expert_choice:
        raise UpcycleConfigError(
            "balance_scope='global_batch' applies to the load-balancing loss of top-k routing; "
            "expert_choice routing has none (it is balanced by construction).")
    _positive("routed_scaling_factor", config.routed_scaling_factor,
              "the factor on the combine weights, 1.0 to keep them as routed")
    if not isinstance(config.weight_scaling, bool):
        raise UpcycleConfigError(f"weight_scaling={config.weight_scaling!r} must be True or False.")
    if config.weight_scaling and config.normalize_weights:
        raise UpcycleConfigError(
            "weight_scaling=True scales unnormalised top-k weights back to the dense function's "
            "scale (2410.07524); with normalize_weights=True they already sum to 1. Pass "
            "normalize_weights=False with it, or leave weight_scaling off.")
    if config.weight_scaling and expert_choice:
        raise UpcycleConfigError("weight_scaling=True applies to top-k routing (k weights per "
                                 "token); expert choice gives tokens varying numbers of experts.")


def routing_preserves_function(config) -> bool:
    """Whether the routing options keep the dense function at conversion (identical experts,
    no capacity limit): renormalised weights, or weight scaling under exactly uniform routing
    (router_init_std=0), and no extra factor."""
    if config.routed_scaling_factor != 1.0:
        return False
    return bool(config.normalize_weights or (config.weight_scaling and config.router_init_std == 0))


def fused_routing_problem(settings) -> str | None:
    """What a layer's routing has that a softmax-then-top-k kernel fed with other logits cannot
    compute (onnxruntime's fused MoE node): None when the scorer's log-scores, softmaxed, give
    the layer's weights (any scorer with `log_scores` when weights are renormalised)."""
    scorer = get_scorer(settings.scoring)
    if get_balancer(settings.balancing).uses_bias:
        return f"balancing={settings.balancing!r}: the fused op has no per-expert selection bias"
    if settings.routed_scaling_factor != 1.0 or settings.weight_scaling:
        return "scaled combine weights: the fused op does not scale the top-k weights"
    if scorer.log_scores is None:
        return f"scoring={settings.scoring!r}: the scorer has no log_scores for the fused op's softmax"
    if not (scorer.sums_to_one or settings.normalize_weights):
        return (f"scoring={settings.scoring!r} without normalize_weights: the fused op's softmax "
                "normalises the scores over all experts")
    return None


def softmax_top_k_problem(settings) -> str | None:
    """What a routing layer's settings have that softmax-then-top-k (with or without
    renormalisation) cannot express: the stock Mixtral/Qwen formats and the fused onnxruntime
    node route that way. None when they express it."""
    if settings.scoring != "softmax":
        return f"scoring={settings.scoring!r}: the target applies softmax to the router logits"
    if get_balancer(settings.balancing).uses_bias:
        return f"balancing={settings.balancing!r}: the target has no per-expert selection bias"
    if settings.routed_scaling_factor != 1.0 or settings.weight_scaling:
        return "scaled combine weights: the target does not scale the top-k weights"
    return None
