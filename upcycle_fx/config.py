"""`UpcycleConfig`: every knob of the rewrite, validated once, in one place."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

from .errors import UpcycleConfigError

ROUTINGS = ("top_k", "expert_choice")
EXPERT_INITS = ("copy", "random")
NAMED_PATTERNS = ("every_other_mlp", "all")

PatternSpec = Union[str, Sequence[int], Callable[..., bool]]


@dataclass(frozen=True)
class UpcycleConfig:
    """How to turn the selected FFNs into MoE layers (DESIGN §2-§3).

    `normalize_weights=True` renormalises the chosen experts' weights to sum to 1: with plain
    copies (no noise) the upcycled model then computes exactly the dense function. False keeps
    softmax-then-top-k weights (NVIDIA's recipe), which scales each FFN output by the routed mass.
    `expert_init="random"` re-initialises every expert instead of copying the FFN (the paper's
    ablation: each weight matrix drawn N(0, σ²) with σ the dense matrix's own std, biases zero).
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
    seed: int | None = None

    def __post_init__(self) -> None:
        _check_int("num_experts", self.num_experts, minimum=1)
        _check_int("top_k", self.top_k, minimum=1)
        if self.routing not in ROUTINGS:
            raise UpcycleConfigError(
                f"routing={self.routing!r} is unknown; choose one of {ROUTINGS} "
                "('top_k' for decoders, 'expert_choice' for encoders and vision)."
            )
        if self.routing == "top_k" and self.top_k > self.num_experts:
            raise UpcycleConfigError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: each token can only "
                f"pick among {self.num_experts} experts; lower top_k or raise num_experts."
            )
        if self.expert_init not in EXPERT_INITS:
            raise UpcycleConfigError(f"expert_init={self.expert_init!r} is unknown; choose one of "
                                     f"{EXPERT_INITS} ('copy' is sparse upcycling).")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise UpcycleConfigError(
                f"capacity_factor={self.capacity_factor} must be > 0 (or None for dropless "
                "top-k routing); 1.25 to 2.0 are the usual values."
            )
        for name in ("router_init_std", "expert_noise_std", "aux_loss_weight", "z_loss_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise UpcycleConfigError(f"{name}={value!r} must be a number >= 0.")
        _check_pattern(self.pattern)


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UpcycleConfigError(f"{name}={value!r} must be an integer >= {minimum}.")


def _check_pattern(pattern: PatternSpec) -> None:
    if isinstance(pattern, str):
        if pattern not in NAMED_PATTERNS:
            raise UpcycleConfigError(
                f"pattern={pattern!r} is unknown; use one of {NAMED_PATTERNS}, a list of FFN "
                "indices (execution order, see upcycle_fx.find_mlps), or a callable on an MLPMatch."
            )
    elif callable(pattern):
        return
    else:
        try:
            indices = list(pattern)
        except TypeError:
            raise UpcycleConfigError(
                f"pattern={pattern!r} is neither a name, a list of indices nor a callable."
            ) from None
        bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise UpcycleConfigError(f"pattern indices must be integers >= 0; got {bad}.")
