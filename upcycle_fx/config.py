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
from typing import Callable, Mapping, Sequence, Union

from .errors import UpcycleConfigError
from .moe.options import check_routing_options

ROUTINGS = ("top_k", "expert_choice")
NAMED_PATTERNS = ("every_other_mlp", "all")
MAX_EXPERTS = 4096  # far above any published MoE (DeepSeek-V3: 256); beyond it is a typo
SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes

PatternSpec = Union[str, Sequence[int], Callable[..., bool]]
# One routing for every FFN; per stack ({"encoder": "expert_choice", "decoder": "top_k"}) and/or
# per FFN index ({0: "top_k"}); or a callable on an MLPMatch returning a routing name.
RoutingSpec = Union[str, Mapping[Union[str, int], str], Callable[..., str]]


@dataclass(frozen=True)
class UpcycleConfig:
    """How to turn the selected FFNs into MoE layers (DESIGN §2-§3).

    `normalize_weights=True` renormalises the chosen experts' weights to sum to 1: with plain
    copies (no noise) the upcycled model then computes exactly the dense function. False keeps
    softmax-then-top-k weights (NVIDIA's recipe), which scales each FFN output by the routed mass.
    `expert_init="random"` re-initialises every expert instead of copying the FFN (the paper's
    ablation: each weight matrix drawn N(0, σ²) with σ the dense matrix's own std, biases zero);
    `"drop"` is Drop-Upcycling: each expert re-draws its own random `drop_ratio` share of hidden
    units (default 0.5). The names are those of `upcycle_fx.moe.expert_init` (a registry).

    Fine-grained experts: `granularity=G` splits each FFN into G segments of d_ff/G hidden units;
    `num_experts` and `top_k` count the layer's own (fine) experts, as Megatron-Core's
    `--num-experts` / `--moe-router-topk` with `--moe-upcycling-granularity` do: E copies of each
    segment are `num_experts=E·G`, and the same active compute as top-k of whole copies is
    `top_k=k·G`. `num_shared_experts` always-active experts of that width sit beside the routed
    ones (DeepSeekMoE, Qwen2-MoE); `shared_expert_gate` multiplies them by a sigmoid gate as
    Qwen2-MoE does. How the function is kept: `upcycle_fx.moe.segments`.
    `routing` may differ per stack or FFN: {"encoder": "expert_choice", "decoder": "top_k"} (the
    paper's setting), FFN indices as keys, or a callable on an MLPMatch (see passes/stack_routing.py).

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
    routing: RoutingSpec = "top_k"
    capacity_factor: float | None = None
    normalize_weights: bool = True
    router_init_std: float = 0.02
    expert_noise_std: float = 0.0
    expert_init: str = "copy"
    drop_ratio: float | None = None
    granularity: int = 1
    num_shared_experts: int = 0
    shared_expert_gate: bool = False
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
        _check_routing(self)
        if self.routing != "expert_choice" and self.top_k > self.num_experts:
            raise UpcycleConfigError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: each token can only "
                f"pick among {self.num_experts} experts; lower top_k or raise num_experts."
            )
        _check_experts(self)
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


def _check_experts(config: UpcycleConfig) -> None:
    """Expert initialisation, fine-grained and shared experts (the parts the model cannot tell)."""
    from .moe.expert_init import DEFAULT_DROP_RATIO, expert_init_names
    from .moe.segments import routed_group_size

    _check_choice("expert_init", config.expert_init, expert_init_names(), "'copy' is sparse upcycling")
    if config.drop_ratio is not None:
        check_number("drop_ratio", config.drop_ratio,
                     hint=f"the share of each expert's hidden units Drop-Upcycling re-draws, {DEFAULT_DROP_RATIO} in the paper")
        if config.expert_init != "drop":
            raise UpcycleConfigError(f"drop_ratio={config.drop_ratio!r} only applies to expert_init='drop' "
                                     f"(got expert_init={config.expert_init!r}); drop it or set expert_init='drop'.")
        if not 0.0 <= config.drop_ratio <= 1.0:
            raise UpcycleConfigError(f"drop_ratio={config.drop_ratio!r} must be in [0, 1]: the share of each "
                                     f"expert's hidden units re-drawn ({DEFAULT_DROP_RATIO} in the paper, 0 = copies).")
    check_int("granularity", config.granularity, minimum=1, maximum=MAX_EXPERTS,
              hint="the number of segments each FFN's hidden units are split into, 1 = whole copies")
    check_int("num_shared_experts", config.num_shared_experts, minimum=0, maximum=MAX_EXPERTS,
              hint="always-active experts beside the routed ones, 0 for none")
    check_bool("shared_expert_gate", config.shared_expert_gate)
    if config.shared_expert_gate and not config.num_shared_experts:
        raise UpcycleConfigError("shared_expert_gate=True needs num_shared_experts >= 1: there is no "
                                 "shared expert to gate.")
    g, n = config.granularity, config.num_shared_experts
    if g > 1 and n >= g:
        raise UpcycleConfigError(
            f"num_shared_experts={n} with granularity={g}: shared experts are segments of the FFN, so at "
            f"most {g - 1} of its {g} segments can be shared (the rest feed the routed experts); use "
            "fewer shared experts, a larger granularity, or granularity=1 (shared experts are copies).")
    group = routed_group_size(g, n)
    if config.num_experts % group:
        raise UpcycleConfigError(
            f"num_experts={config.num_experts} is not a multiple of {group}, the routed segments per FFN "
            f"(granularity={g}" + (f" minus {n} shared" if n and g > 1 else "") + "): each routed "
            f"segment needs the same number of copies; use num_experts={group * max(1, config.num_experts // group)}.")


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


def _check_routing(config: "UpcycleConfig") -> None:
    """A routing name, a non-empty mapping of stack names / FFN indices to routing names (kept
    as a copy, so later changes to the caller's dict do not change the config), or a callable.
    Whether the keys name stacks of the model is checked by `upcycle` once the FFNs are found."""
    routing, hint = config.routing, "'top_k' for decoders, 'expert_choice' for encoders and vision"
    if isinstance(routing, Mapping):
        if not routing:
            raise UpcycleConfigError("routing={} names no stack; give a routing name ('top_k') or "
                                     "e.g. {'encoder': 'expert_choice', 'decoder': 'top_k'}.")
        for key, value in routing.items():
            if isinstance(key, bool) or not (isinstance(key, str) and key
                                             or isinstance(key, numbers.Integral) and key >= 0):
                raise UpcycleConfigError(
                    f"routing key {key!r} must be a stack name ('encoder', 'decoder', or a stack "
                    "path like 'model.decoder.layers') or an FFN index >= 0 (see upcycle_fx.find_mlps).")
            _check_choice(f"routing[{key!r}]", value, ROUTINGS, hint)
        object.__setattr__(config, "routing", dict(routing))
    elif not callable(routing):
        _check_choice("routing", routing, ROUTINGS, hint + "; or a mapping per stack, e.g. "
                      "{'encoder': 'expert_choice', 'decoder': 'top_k'}")


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
