"""A probe that vouches for an activation module's name.

Kernels that compute the activation themselves (ONNX Runtime's fused MoE, the Triton decode
kernel) know it only by `Experts.activation_name`. A name is trusted only after the module has
been run on a grid of points and found to compute the reference function of that name's record
(`upcycle_fx.activations`), so a misnamed or customised module makes those paths step aside
instead of computing something else.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..activations import activation_names, describe, get_activation

PROBE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

_verdicts: "weakref.WeakKeyDictionary[nn.Module, dict[str, str | None]]" = weakref.WeakKeyDictionary()


def probe(activation: nn.Module, name: str, dtype: torch.dtype = torch.float32,
          device: torch.device | str = "cpu") -> str | None:
    """None if `activation` computes the reference function of `name` (in `dtype` on `device`),
    else why not. Runs the module once on 161 points in [-8, 8]."""
    record = get_activation(name)
    if record is None:
        return f"activation {describe(name)}: no record, so no reference function (records: {', '.join(activation_names())})"
    grid = torch.linspace(-8.0, 8.0, 161, dtype=torch.float32, device=device)
    try:
        with torch.no_grad():
            got = activation(grid.to(dtype)).float()
    except Exception as error:  # noqa: BLE001 - any failure means we cannot vouch for it
        return f"activation module {type(activation).__name__} failed on a probe: {error}"
    want = record.reference(grid.to(dtype).float())
    error = float((got - want).abs().max() / want.abs().max())
    if not error <= PROBE_TOLERANCE.get(dtype, 1e-5):
        return (f"activation module {type(activation).__name__} does not compute {name} "
                f"(probe relative error {error:.1e})")
    return None


def cached_probe(activation: nn.Module, name: str) -> str | None:
    """`probe` in float32 on the CPU, remembered per module and name: cheap enough for a hot path,
    and it never touches (or synchronises) the GPU."""
    verdicts = _verdicts.setdefault(activation, {})
    if name not in verdicts:
        verdicts[name] = probe(activation, name)
    return verdicts[name]
