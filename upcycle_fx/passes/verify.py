"""Verification pass: run dense and upcycled models on the same inputs and compare.

The safety net behind "never silently wrong": when the configuration preserves the function
(top-k, renormalised weights, no noise, no capacity limit) and inputs are at hand (the
user's, an HF model's own, or ones built from a plain module's first layer), any difference
beyond rounding is an error, not a result. The error names the FFNs responsible: each
converted FFN is converted alone on a fresh copy and checked the same way.

Tolerances (relative: max |sparse - dense| / max |dense| over every floating output), with the
worst error measured over the test zoo (25 models, every FFN converted, top_k 1, 2 and 4):

* float32: 1e-5, the bar the project promises (DESIGN §8); measured 5.4e-7.
* float64: 1e-5 as well. The router runs in float32 whatever the model's dtype, so the
  renormalised top-k weights sum to 1 only to a few float32 ulps (k·2^-24 per layer): a float64
  model is exactly as precise as the float32 routing, not more; measured 1.9e-7 (the former
  1e-8 refused every top_k >= 2 conversion). Real rewriting mistakes (a dropped bias, a wrong
  activation, a scaled weight) give 1e-4 and more.
* bfloat16: 3e-2 and float16: 5e-3, about 4 and 5 ulps of each format at 1: the experts'
  matmuls round in a different order than the dense layers did; measured 8.8e-3 and 1.5e-3.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture.inputs import ModelInputs
from ..capture.snapshot import left_as_found
from ..config import UpcycleConfig
from ..errors import RewriteError
from ..moe.options import routing_preserves_function
from ..report import moe_layers, relative_error

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
DEFAULT_TOLERANCE = 1e-5
MAX_BISECT = 64  # FFNs converted one at a time to name the faulty ones


def preserves_function(config: UpcycleConfig) -> bool:
    """Whether the configuration computes the dense function at conversion. A routing mapping
    preserves it when every layer it names is top-k (unnamed layers are top-k); a callable's
    choices are not known before the rewrite, so it is not counted as preserving."""
    from ..moe.expert_init import expert_init
    from ..moe.segments import routed_group_size

    routing = config.routing
    top_k_everywhere = (routing == "top_k" if isinstance(routing, str)
                        else isinstance(routing, Mapping) and all(v == "top_k" for v in routing.values()))
    whole_groups = config.top_k % routed_group_size(config.granularity, config.num_shared_experts) == 0
    return (top_k_everywhere and routing_preserves_function(config)
            and config.expert_noise_std == 0 and config.capacity_factor is None
            and expert_init(config.expert_init).preserves_function(config) and whole_groups)


def tolerance_for(dtype: torch.dtype) -> float:
    """The relative error an exact conversion may show in `dtype` (see module doc)."""
    return TOLERANCE.get(dtype, DEFAULT_TOLERANCE)


@contextlib.contextmanager
def _quiet_eval(*models: nn.Module):
    """Eval mode, no grad, and every model left as found (buffers, modes, MoE statistics)."""
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(left_as_found(model))
        for model in models:
            model.eval()
        with torch.no_grad():
            yield
    for model in models:
        for _, moe in moe_layers(model):
            moe.reset_stats()  # the check is not a training step


def _float_outputs(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _outputs(model: nn.Module, inputs: ModelInputs) -> list[torch.Tensor]:
    """Outputs under one fixed random state, so a forward that draws at random in eval mode
    (MAE's patch masking) draws the same for the dense and the upcycled model; the caller's
    random state is left as it was."""
    devices = sorted({t.device.index or 0 for t in inputs.tensors() if t.device.type == "cuda"})
    with _quiet_eval(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        return _float_outputs(inputs.call(model))


def _error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    if len(expected) != len(actual) or not expected:
        return float("inf")
    return max(relative_error(a, e) for a, e in zip(actual, expected))


def run_upcycled(sparse: nn.Module, inputs: ModelInputs) -> list[torch.Tensor]:
    """The upcycled model's floating outputs on inputs the dense model runs on; RewriteError
    where it raises instead (checked even where the configuration changes the function)."""
    try:
        return _outputs(sparse, inputs)
    except Exception as error:  # the dense model runs on these inputs: the rewrite broke it
        raise RewriteError(
            f"the upcycled model fails on the example inputs on which the dense model runs "
            f"({type(error).__name__}: {error}); an FFN's weights or modules are probably used "
            "by code the capture could not see. Please report it with the model class; pass "
            "verify=False to get the model anyway.") from error


def verify_upcycled(dense: nn.Module, sparse: nn.Module, inputs: ModelInputs, *,
                    convert_one: Callable[[object], nn.Module] | None = None,
                    converted: Sequence = ()) -> float:
    """Largest relative error over the floating outputs; RewriteError beyond the tolerance,
    naming the FFNs that are wrong on their own when `convert_one(match)` is given."""
    expected = _outputs(dense, inputs)
    _refuse_non_finite(dense, expected)
    actual = run_upcycled(sparse, inputs)
    if len(expected) != len(actual) or not expected:
        raise RewriteError("the upcycled model returns different outputs than the dense model "
                           f"({len(actual)} vs {len(expected)} floating tensors)")
    error = _error(actual, expected)
    tolerance = tolerance_for(expected[0].dtype)
    if error <= tolerance:
        return error
    culprits = _culprits(inputs, expected, tolerance, convert_one, converted)
    raise RewriteError(
        f"the upcycled model differs from the dense model by {error:.2e} (relative; tolerance "
        f"{tolerance:.0e} in {expected[0].dtype}) on the example inputs, although the "
        f"configuration preserves the function. {culprits} Please report it with the model "
        "class; pass verify=False to get the model anyway.")


def _refuse_non_finite(dense: nn.Module, expected: list[torch.Tensor]) -> None:
    bad = [(i, int((~torch.isfinite(t)).sum()), t.numel()) for i, t in enumerate(expected)
           if not bool(torch.isfinite(t).all())]
    if bad:
        where = ", ".join(f"output {i}: {n} of {total} values" for i, n, total in bad[:3])
        raise RewriteError(
            f"the dense model itself gives NaN/inf on these inputs ({type(dense).__name__}, {where}), "
            "so the rewrite cannot be checked on them. Pass example_inputs= on which the dense "
            "model is finite (in range, in a dtype that does not overflow), or verify=False.")


def _culprits(inputs: ModelInputs, expected: list[torch.Tensor], tolerance: float,
              convert_one, converted: Sequence) -> str:
    """Which FFNs change the function when converted alone (a sentence for the error)."""
    if convert_one is None or not converted:
        return "An FFN was rewritten wrongly."
    wrong = []
    for match in list(converted)[:MAX_BISECT]:
        alone = convert_one(match)
        error = _error(_outputs(alone, inputs), expected)
        if not error <= tolerance:
            paths = [path for path, _ in moe_layers(alone)] or ["(spliced into its block)"]
            wrong.append(f"FFN {match.describe()} -> MoE at {', '.join(paths)}: {error:.2e}")
        del alone
    if not wrong:
        return ("Each FFN converted alone preserves the function; they differ only together "
                f"({', '.join(m.describe() for m in converted[:4])}).")
    return "Converted alone, these FFNs change the function: " + "; ".join(wrong[:6]) + "."
