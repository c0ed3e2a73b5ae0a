"""`rewrite` trials: a model spec, keyword arguments, and which example inputs to give.

`RewriteCase.run()` builds the model, calls `upcycle_fx.rewrite` under the oracle and returns
the verdict. The `models` family draws random FFN styles and twists with ordinary arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

from .models import STYLES, ModelSpec, activations_for, twists_for
from .oracle import Outcome, check_conversion

EXAMPLES = ("given", "none", "wrong_last_dim", "string", "integer_dtype")
INVALID_EXAMPLES = EXAMPLES[2:]


@dataclass(frozen=True)
class RaisingPattern:
    """A selection callable that raises (a user's bug the rewrite must report by name)."""

    def __call__(self, match) -> bool:
        raise RuntimeError("selection callable failed")


@dataclass(frozen=True)
class SelectAll:
    """A valid selection callable."""

    def __call__(self, match) -> bool:
        return True


def preserves(kwargs: dict[str, Any]) -> bool:
    """Whether these arguments keep the dense function (README: "Which setting preserves")."""
    return (kwargs.get("routing", "top_k") == "top_k" and kwargs.get("normalize_weights", True) is True
            and kwargs.get("expert_noise_std", 0.0) == 0 and kwargs.get("capacity_factor") is None
            and kwargs.get("expert_init", "copy") == "copy"
            and kwargs.get("routed_scaling_factor", 1.0) == 1.0)


def example_inputs(kind: str, x: torch.Tensor) -> Any:
    return {"given": (x,), "none": None, "wrong_last_dim": (torch.randn(*x.shape[:-1], x.shape[-1] + 3),),
            "string": "not a tensor",
            "integer_dtype": (torch.ones(x.shape, dtype=torch.long),)}[kind]


@dataclass(frozen=True)
class RewriteCase:
    """`upcycle_fx.rewrite(spec.build(), **kwargs, example_inputs=...)`, judged by the oracle.
    `invalid` names the argument that must be refused (None: every argument is valid)."""

    spec: ModelSpec
    kwargs: dict = field(default_factory=dict)
    example: str = "given"
    input_scale: float = 1.0
    batch: int = 2
    seq: int = 5
    invalid: str | None = None

    @property
    def kind(self) -> str:
        return self.spec.twist

    def run(self) -> Outcome:
        import upcycle_fx

        model = self.spec.build()
        x = self.spec.inputs(self.batch, self.seq, self.input_scale)
        kwargs = dict(self.kwargs)
        if self.example != "none":
            kwargs["example_inputs"] = example_inputs(self.example, x)
        return check_conversion(model, self.spec.build(), (x,), lambda m: upcycle_fx.rewrite(m, **kwargs),
                                preserves=preserves(kwargs), may_mutate=kwargs.get("inplace") is True,
                                invalid=self.invalid)


# Twists whose defect shows best in another style than the first one (hypothesis's simplest
# draw of a stratum takes the first value of each list, so it is the most telling case).
_FIRST_STYLE = {"block_attrs": "inline", "weight_read": "inline"}
# The simplest draw gives no example inputs (nothing then checks the result), except where the
# example inputs are what exposes the defect (capture runs the model on them).
_FIRST_EXAMPLE = {"batchnorm_train": "given", "weight_read": "given"}


def _styles(twist: str) -> list[str]:
    styles = [s for s in STYLES if twist in twists_for(s)]
    first = _FIRST_STYLE.get(twist)
    return sorted(styles, key=lambda s: s != first)


@st.composite
def model_specs(draw, *, twist: str = "none", dtypes=("float32",), max_layers: int = 3) -> ModelSpec:
    style = draw(st.sampled_from(_styles(twist)))
    return ModelSpec(
        style=style, d=draw(st.sampled_from((8, 12, 16))), f=draw(st.sampled_from((8, 20, 32))),
        layers=draw(st.integers(1, max_layers)), bias=draw(st.booleans()),
        act=draw(st.sampled_from(activations_for(style))), twist=twist,
        norm=draw(st.sampled_from(("layernorm", "none"))), seed=draw(st.integers(0, 2**16)),
        dtype=draw(st.sampled_from(dtypes)), mode=draw(st.sampled_from(("train", "eval"))),
        target=draw(st.sampled_from(("last", "first"))))


@st.composite
def model_cases(draw, twist: str) -> RewriteCase:
    """Random model with `twist`, ordinary arguments; mostly function-preserving so exactness is
    checked."""
    spec = draw(model_specs(twist=twist))
    experts = draw(st.integers(2, 6))
    kwargs: dict[str, Any] = {
        "pattern": draw(st.sampled_from(("all", "every_other_mlp", [0], SelectAll()))),
        "num_experts": experts, "top_k": draw(st.integers(1, min(2, experts))),
        "seed": draw(st.sampled_from((None, 0, 7)))}
    if draw(st.integers(0, 4)) == 4:  # sometimes a configuration that changes the function
        kwargs |= draw(st.sampled_from(({"routing": "expert_choice"}, {"capacity_factor": 1.0},
                                        {"normalize_weights": False}, {"expert_noise_std": 0.01},
                                        {"expert_init": "random"})))
    examples = sorted(("none", "given"), key=lambda e: e != _FIRST_EXAMPLE.get(twist, "none"))
    return RewriteCase(spec, kwargs, example=draw(st.sampled_from(examples)),
                       batch=draw(st.integers(1, 3)), seq=draw(st.integers(2, 6)))
