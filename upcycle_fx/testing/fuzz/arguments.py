"""Argument fuzzing: every argument of `rewrite` / `UpcycleConfig`, valid and invalid values.

Each argument has values that must be accepted and values that must be refused with a named
error before any work is done. A refused value that is accepted anyway is a silent wrong result
(the user asked for something that was not done); an unnamed exception is a defect too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hypothesis import strategies as st

from .oracle import Category, Outcome, classify_exception
from .rewriting import EXAMPLES, INVALID_EXAMPLES, RaisingPattern, RewriteCase, SelectAll, model_specs

NAN, INF = float("nan"), float("inf")

# argument -> (valid values, invalid values); models in this family have exactly 2 FFNs.
REWRITE_ARGUMENTS: dict[str, tuple[tuple, tuple]] = {
    "pattern": (("all", "every_other_mlp", [0], [0, 1], [1], SelectAll()),
                ([0, 0], {0: True}, [2], [99], [-1], [], "every_third_mlp", RaisingPattern(), "0", [0.5],
                 [True], None)),
    "num_experts": ((2, 4, 8), (0, -1, 2**40, 2**62, 1.5, "4", True, None, NAN)),
    "top_k": ((1, 2), (0, -1, 2**40, 1.0, "2", None, True)),
    "routing": (("top_k", "expert_choice"), ("Top_K", "switch", None, 3)),
    "capacity_factor": ((None, 0.5, 1.0, 1.25, 2.0), (INF, NAN, "1.25", 0, -1.0, True, -INF)),
    "normalize_weights": ((True, False), (None, "no", "False", 2)),
    "router_init_std": ((0.02, 0.0, 1.0), (NAN, INF, -0.1, "0.02", None)),
    "expert_noise_std": ((0.0, 0.01), (NAN, INF, -1.0, "0", None)),
    "expert_init": (("copy", "random"), ("zeros", None, 0)),
    "aux_loss_weight": ((0.0, 0.01), (NAN, INF, -1.0, "0.01", None)),
    "z_loss_weight": ((0.0, 0.001), (NAN, INF, -1.0, None)),
    "scoring": (("softmax", "sigmoid"), ("Sigmoid", "tanh", None, 1)),
    "balancing": (("loss", "bias"), ("aux_loss", None, 0)),
    "bias_update_speed": ((0.001, 0.01), (NAN, INF, -0.001, "0.001", None, True)),
    "balance_scope": (("micro_batch", "global_batch"), ("global", None, 1)),
    "routed_scaling_factor": ((1.0, 2.5), (0.0, -1.0, NAN, INF, "1", None, True)),
    "weight_scaling": ((False,), (True, "yes", None, 1)),
    "seed": ((None, 0, 123), ("abc", 1.5, [1])),
    "inplace": ((False, True), ("no", "yes", 1, None)),
    "verify": ((True, False), ("no", None)),
    "leaf_modules": (((),), (42, [42], "abc")),
}
CONFIG_FIELDS = tuple(k for k in REWRITE_ARGUMENTS if k not in ("inplace", "verify", "leaf_modules"))
# Invalid only for a given model (indices past its FFNs): UpcycleConfig alone cannot know.
MODEL_DEPENDENT = {"pattern": ([2], [99])}


@dataclass(frozen=True)
class ConfigCase:
    """`UpcycleConfig(**kwargs)`: a valid config or a named error, nothing else."""

    kwargs: dict = field(default_factory=dict)
    invalid: str | None = None

    @property
    def kind(self) -> str:
        return (self.invalid or "valid").split("=")[0]

    def run(self) -> Outcome:
        from upcycle_fx import UpcycleConfig

        try:
            UpcycleConfig(**self.kwargs)
        except Exception as error:  # noqa: BLE001
            return classify_exception(error, "UpcycleConfig")
        if self.invalid is not None:
            return Outcome(Category.SILENT_WRONG, f"accepted invalid argument {self.invalid}")
        return Outcome(Category.EXACT)


class ArgumentCase(RewriteCase):
    """A `RewriteCase` whose kind is the fuzzed argument."""

    @property
    def kind(self) -> str:
        return (self.invalid or "valid").split("=")[0]


def _label(name: str, value) -> str:
    from .repro import source

    return f"{name}={source(value)}"


@st.composite
def _arguments(draw, name: str, others: tuple[str, ...]):
    """`name` fuzzed (invalid in two draws of three, the simplest draw included), sometimes one
    other argument with a valid value, so that a verdict is attributable to `name`."""
    valid, bad = REWRITE_ARGUMENTS[name]
    kwargs, invalid = {}, None
    if draw(st.integers(0, 2)) < 2:
        value = draw(st.sampled_from(bad))
        invalid = _label(name, value)
    else:
        value = draw(st.sampled_from(valid))
    kwargs[name] = value
    if draw(st.booleans()):
        other = draw(st.sampled_from([n for n in others if n != name]))
        kwargs.setdefault(other, draw(st.sampled_from(REWRITE_ARGUMENTS[other][0])))
    kwargs.setdefault("num_experts", 4)
    kwargs.setdefault("top_k", 2)
    return kwargs, invalid


@st.composite
def config_cases(draw, name: str) -> ConfigCase:
    kwargs, invalid = draw(_arguments(name, CONFIG_FIELDS))
    if kwargs.get(name) in MODEL_DEPENDENT.get(name, ()):
        invalid = None  # a valid config; rewrite names it against the model (ArgumentCase)
    return ConfigCase(kwargs, invalid)


@st.composite
def argument_cases(draw, name: str) -> RewriteCase:
    """`rewrite` on a plain two-FFN model with argument `name` (or the example inputs) fuzzed."""
    spec = draw(model_specs(max_layers=1))
    spec = dataclasses.replace(spec, layers=2)
    if name == "example_inputs":
        example = draw(st.sampled_from(INVALID_EXAMPLES))
        return ArgumentCase(spec, {"num_experts": 4, "top_k": 2}, example=example,
                            invalid=f"example_inputs={example}")
    kwargs, invalid = draw(_arguments(name, tuple(REWRITE_ARGUMENTS)))
    return ArgumentCase(spec, kwargs, example=draw(st.sampled_from(EXAMPLES[:2])), invalid=invalid)


ARGUMENT_NAMES = tuple(REWRITE_ARGUMENTS) + ("example_inputs",)
