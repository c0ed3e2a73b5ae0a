"""Verification pass: run dense and upcycled models on the example inputs and compare.

The safety net behind "never silently wrong": when the configuration preserves the function
(top-k, renormalised weights, no noise, no capacity limit) and inputs are at hand (the
user's, or an HF model's own), any difference beyond rounding is an error, not a result.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture.inputs import ModelInputs
from ..config import UpcycleConfig
from ..errors import RewriteError
from ..report import moe_layers, relative_error

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-8, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def preserves_function(config: UpcycleConfig) -> bool:
    return (config.routing == "top_k" and config.normalize_weights
            and config.expert_noise_std == 0 and config.capacity_factor is None
            and config.expert_init == "copy")


@contextlib.contextmanager
def _eval_mode(*models: nn.Module):
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _float_outputs(output) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def verify_upcycled(dense: nn.Module, sparse: nn.Module, inputs: ModelInputs) -> float:
    """Largest relative error over the floating outputs; RewriteError beyond the tolerance."""
    with _eval_mode(dense, sparse), torch.no_grad():
        expected = _float_outputs(inputs.call(dense))
        actual = _float_outputs(inputs.call(sparse))
    for _, moe in moe_layers(sparse):
        moe.reset_stats()  # the check is not a training step
    if len(expected) != len(actual) or not expected:
        raise RewriteError("the upcycled model returns different outputs than the dense model "
                           f"({len(actual)} vs {len(expected)} floating tensors)")
    error = max(relative_error(a, e) for a, e in zip(actual, expected))
    tolerance = TOLERANCE.get(expected[0].dtype, 1e-4)
    if not error <= tolerance:
        raise RewriteError(
            f"the upcycled model differs from the dense model by {error:.2e} (relative; tolerance "
            f"{tolerance:.0e}) on the example inputs, although the configuration preserves the "
            "function. An FFN was rewritten wrongly: please report it with the model class; "
            "pass verify=False to get the model anyway.")
    return error
