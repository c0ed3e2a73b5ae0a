"""Numerics at the extremes: bf16 / fp16 models, inputs from 1e-4 up to near the dtype's range,
capacity routings with few tokens (empty slots, dropped assignments), slightly noisy experts
(copies: an expert that overflows where the dense FFN does not is a routing or dispatch defect).

The oracle asks for no NaN/inf where the dense model is finite and, for function-preserving
configurations, the dense output within the dtype's tolerance. `DispatchCase` checks the
dispatch paths against the reference loop once the experts differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from .models import ModelSpec
from .oracle import Outcome, classify_exception, compare_outputs, eval_forward
from .rewriting import RewriteCase, model_specs

# Largest input magnitude exponent per dtype (fp16 overflows at 65504, bf16 near 3e38).
_MAX_EXPONENT = {"float32": 38, "bfloat16": 38, "float16": 4}


class NumericsCase(RewriteCase):
    """A `RewriteCase` whose kind is the dtype and routing."""

    @property
    def kind(self) -> str:
        routing = self.kwargs.get("routing", "top_k")
        if routing == "top_k" and self.kwargs.get("capacity_factor") is not None:
            routing = "top_k+capacity"
        return f"{self.spec.dtype}/{routing}"


STRATA = tuple(f"{dtype}/{routing}" for dtype in ("bfloat16", "float16", "float32")
               for routing in ("top_k", "top_k+capacity", "expert_choice"))


@st.composite
def numerics_cases(draw, stratum: str) -> RewriteCase:
    """A model in the stratum's dtype and routing; the simplest draw has the largest inputs."""
    dtype, routing = stratum.split("/")
    spec = dataclasses.replace(draw(model_specs(dtypes=(dtype,), max_layers=2)),
                               norm=draw(st.sampled_from(("none", "layernorm"))), clamp=draw(st.sampled_from((True, False))))
    experts = draw(st.integers(2, 8))
    kwargs = {"pattern": "all", "num_experts": experts, "routing": routing.removesuffix("+capacity"),
              "top_k": draw(st.integers(1, min(2, experts))),
              "normalize_weights": draw(st.sampled_from((True, False))),
              "expert_noise_std": draw(st.sampled_from((0.01, 0.0))),
              "router_init_std": draw(st.sampled_from((10.0, 1.0, 0.02))),
              "seed": 0}
    if routing != "top_k":
        kwargs["capacity_factor"] = draw(st.sampled_from((0.25, 0.5, 1.0, 1.25, 2.0)))
    exponent = _MAX_EXPONENT[dtype] - draw(st.integers(0, _MAX_EXPONENT[dtype] + 4))
    return NumericsCase(spec, kwargs, example=draw(st.sampled_from(("none", "given"))),
                        input_scale=float(10 ** exponent), batch=draw(st.integers(1, 2)),
                        seq=draw(st.integers(1, 4)))


@dataclass(frozen=True)
class DispatchCase:
    """An upcycled model whose expert `drift_expert` was scaled by `drift_factor` (as experts
    drift apart in training), run with the automatic dispatch against the reference loop over
    experts (`dispatch_impl="loop"`, the test oracle of `moe/dispatch.py`): the same outputs, and
    no NaN/inf where the loop is finite (an expert's overflow must not reach tokens it does not
    serve)."""

    spec: ModelSpec
    kwargs: dict = field(default_factory=dict)
    drift_expert: int | None = None
    drift_factor: float = 1.0
    input_scale: float = 1.0
    batch: int = 1
    seq: int = 3

    @property
    def kind(self) -> str:
        return NumericsCase(self.spec, self.kwargs).kind

    def run(self) -> Outcome:
        import upcycle_fx

        try:
            model = upcycle_fx.rewrite(self.spec.build(), **self.kwargs)
        except Exception as error:  # noqa: BLE001
            return classify_exception(error, "conversion")
        layers = [moe for _, moe in upcycle_fx.moe_layers(model)]
        x = self.spec.inputs(self.batch, self.seq, self.input_scale)
        try:
            eval_forward(model, (x,))  # expert loads, to find an idle expert
            with torch.no_grad():
                for moe in layers:
                    expert = self._expert(moe)
                    moe.experts.up_proj[expert] *= self.drift_factor
                    moe.experts.down_proj[expert] *= self.drift_factor
            actual = eval_forward(model, (x,))
            for moe in layers:
                moe.dispatch_impl = "loop"
            expected = eval_forward(model, (x,))
        except Exception as error:  # noqa: BLE001
            return classify_exception(error, "forward")
        return compare_outputs(actual, expected, preserves=True, reference="the reference loop")

    def _expert(self, moe) -> int:
        """`drift_expert`, or (None) an expert that served no token on these inputs."""
        if self.drift_expert is not None:
            return self.drift_expert % moe.experts.num_experts
        idle = (moe.last_expert_load == 0).nonzero().flatten().tolist()
        return idle[0] if idle else 0


@st.composite
def dispatch_cases(draw, stratum: str) -> DispatchCase:
    """The simplest draw: an idle expert scaled to overflow."""
    dtype, routing = stratum.split("/")
    experts = draw(st.integers(4, 8))
    kwargs = {"pattern": "all", "num_experts": experts, "routing": routing.removesuffix("+capacity"),
              "top_k": draw(st.integers(1, 2)), "seed": draw(st.integers(0, 3))}
    if routing != "top_k":
        kwargs["capacity_factor"] = draw(st.sampled_from((0.25, 0.5, 1.0, 2.0)))
    spec = ModelSpec(style=draw(st.sampled_from(("dense", "gated", "fused_chunk"))), act="silu",
                     d=8, f=8, layers=1, norm="none", dtype=dtype, seed=draw(st.integers(0, 99)))
    return DispatchCase(spec, kwargs, drift_expert=draw(st.sampled_from((None,) + tuple(range(8)))),
                        drift_factor=draw(st.sampled_from((1e20, 1e3, 2.0, 1.0))),
                        input_scale=draw(st.sampled_from((1.0, 10.0, 0.01))),
                        batch=draw(st.integers(1, 2)), seq=draw(st.integers(2, 5)))
