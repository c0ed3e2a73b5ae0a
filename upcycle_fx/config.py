"""`UpcycleConfig`: every knob of the rewrite, validated once, in one place.

Everything that can be checked without the model is checked here, when the config is built:
before any tracing, copying or allocation. Types are strict (a string is not a number, `None`
or `1` is not a bool): a value of the wrong type is a mistake, not something to coerce.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from .errors import UpcycleConfigError
from .moe.options import check_routing_options

ROUTINGS = ("top_k", "expert_choice")
EXPERT_INITS = ("copy", "random")
NAMED_PATTERNS = ("every_other_mlp", "all")
MAX_EXPERTS = 4096  # far above any published MoE (DeepSeek-V3: 256); beyond it is a typo
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes

PatternSpec = Union[str, Sequence[int], Callable[..., bool]]


@dataclass(frozen=True)
class UpcycleConfig:
    """How to turn the selected FFNs into MoE layers (DESIGN §2-§3).

    `normalize_weights=True` renormalises the chosen experts' weights to sum to 1: with plain
    copies (no noise) the upcycled model then computes exactly the dense function. False keeps
    softmax-then-top-k weights (NVIDIA's recipe), which scales each FFN output by the routed mass.
    `expert_init="random"` re-initialises every expert instead of copying the FFN (the paper's
    ablation: each weight matrix drawn N(0, σ²) with σ the dense matrix's own std, biases zero).

    Routing options (`upcycle_fx.moe.options`): `scoring` names a registered scorer ("softmax";
    "sigmoid" as DeepSeek-V3); `balancing="bias"` balances by a per-expert selection bias moved
    by `bias_update_speed` after each optimizer step (the Switch loss is still added while
    `aux_loss_weight > 0`); `balance_scope="global_batch"` counts the loss's expert loads over all
    micro-batches and ranks of an optimizer step; `routed_scaling_factor` multiplies the combine
    weights; `weight_scaling=True` (with `normalize_weights=False`) multiplies them by E/k
    (softmax) or 2/k (sigmoid), 2410.07524's scaling to the dense function's scale.
    """

    pattern: PatternSpec = "every_other_mlp"
    num_experts: int = 8
    top_k: int = 2
    routing: str = "top_k"
    capacity_factor: float | None = None
    normalize_weights: bool = True
    router_init_std: float = 0.02
    expert_noise_std: float = 0.0
    expert_init: str = "copy"
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    scoring: str = "softmax"
    balancing: str = "loss"
    bias_update_speed: float = 0.001
    balance_scope: str = "micro_batch"
    routed_scaling_factor: float = 1.0
    weight_scaling: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        check_int("num_experts", self.num_experts, minimum=1, maximum=MAX_EXPERTS,
                  hint="the number of experts each converted FFN becomes, 8 to 64 are usual")
        check_int("top_k", self.top_k, minimum=1)
        _check_choice("routing", self.routing, ROUTINGS,
                      "'top_k' for decoders, 'expert_choice' for encoders and vision")
        if self.routing == "top_k" and self.top_k > self.num_experts:
            raise UpcycleConfigError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: each token can only "
                f"pick among {self.num_experts} experts; lower top_k or raise num_experts."
            )
        _check_choice("expert_init", self.expert_init, EXPERT_INITS, "'copy' is sparse upcycling")
        if self.capacity_factor is not None:
            check_number("capacity_factor", self.capacity_factor,
                         hint="None for dropless top-k routing; 1.25 to 2.0 are the usual values")
            if not self.capacity_factor > 0:
                raise UpcycleConfigError(
                    f"capacity_factor={self.capacity_factor} must be > 0 (or None for dropless "
                    "top-k routing); 1.25 to 2.0 are the usual values."
                )
        check_bool("normalize_weights", self.normalize_weights)
        for name in ("router_init_std", "expert_noise_std", "aux_loss_weight", "z_loss_weight"):
            check_number(name, getattr(self, name), hint="a real number >= 0")
            if getattr(self, name) < 0:
                raise UpcycleConfigError(f"{name}={getattr(self, name)!r} must be a number >= 0.")
        check_routing_options(self)
        if self.seed is not None:
            check_int("seed", self.seed, minimum=SEED_RANGE[0], maximum=SEED_RANGE[1],
                      hint="or None to draw from torch's global generator")
        _check_pattern(self.pattern)


def check_int(name: str, value: object, *, minimum: int, maximum: int | None = None,
              hint: str = "") -> None:
    """A real integer (not a bool, float or string) in [minimum, maximum]."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum
            or (maximum is not None and value > maximum)):
        bound = f">= {minimum}" + ("" if maximum is None else f" and <= {maximum}")
        raise UpcycleConfigError(f"{name}={value!r} must be an integer {bound}"
                                 + (f": {hint}." if hint else "."))


def check_number(name: str, value: object, *, hint: str) -> None:
    """A real, finite number (not a bool or a string): NaN or inf would poison every weight."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise UpcycleConfigError(f"{name}={value!r} must be a finite number: {hint}.")


def check_bool(name: str, value: object) -> None:
    """Exactly True or False: "no", "False", 1 and None are mistakes, not booleans."""
    if not isinstance(value, bool):
        raise UpcycleConfigError(f"{name}={value!r} must be True or False "
                                 f"(got a {type(value).__name__}).")


def _check_choice(name: str, value: object, choices: tuple[str, ...], hint: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise UpcycleConfigError(f"{name}={value!r} is unknown; choose one of {choices} ({hint}).")


def _check_pattern(pattern: PatternSpec) -> None:
    if isinstance(pattern, str):
        if pattern not in NAMED_PATTERNS:
            raise UpcycleConfigError(
                f"pattern={pattern!r} is unknown; use one of {NAMED_PATTERNS}, a list of FFN "
                "indices (execution order, see upcycle_fx.find_mlps), or a callable on an MLPMatch."
            )
        return
    if callable(pattern):
        return
    if not isinstance(pattern, (list, tuple, range)):
        raise UpcycleConfigError(
            f"pattern={pattern!r} ({type(pattern).__name__}) is neither a name {NAMED_PATTERNS}, "
            "a list or tuple of FFN indices, nor a callable on an MLPMatch."
        )
    bad = [i for i in pattern if isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0]
    if bad:
        raise UpcycleConfigError(f"pattern indices must be integers >= 0; got {bad}.")
    repeated = sorted(i for i, n in Counter(pattern).items() if n > 1)
    if repeated:
        raise UpcycleConfigError(f"pattern lists FFN indices {repeated} more than once; each FFN "
                                 "is converted at most once.")
    if not pattern:
        raise UpcycleConfigError("pattern=[] selects no FFN; list the indices to convert "
                                 "(see upcycle_fx.find_mlps) or use 'every_other_mlp' / 'all'.")
