"""Shared test helpers: zoo access and output comparison."""

from __future__ import annotations

import torch

from upcycle_fx.report import first_tensor, relative_error
from upcycle_fx.testing.zoo import ZOO

ZOO_NAMES = list(ZOO)
SIZES = [(2, 8), (3, 5)]
FUNCTION_TOLERANCE = 1e-5  # DESIGN §8: relative error in float32, eval mode


def build(name: str) -> torch.nn.Module:
    return ZOO[name].build()


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return first_tensor(model(**inputs))


def max_error(dense: torch.nn.Module, sparse: torch.nn.Module, name: str) -> float:
    """Largest relative error of `sparse` against `dense` over two input sizes."""
    errors = []
    for batch, seq in SIZES:
        inputs = ZOO[name].inputs(batch, seq)
        errors.append(relative_error(run(sparse, inputs), run(dense, inputs)))
    return max(errors)
