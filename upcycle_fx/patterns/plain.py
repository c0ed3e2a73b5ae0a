"""Which modules of a matched FFN the rewrite may replace: those whose whole behaviour is what the
MoE copies.

The rewrite copies a projection as its weight and bias and an activation as a module, so a
module that does more than that would lose it silently. A projection qualifies only as a plain
linear map: its class runs `nn.Linear.forward` (or Hugging Face `Conv1D.forward`), or a
numerical probe shows that its own `forward` computes `F.linear(x, W, b)` (Falcon's
`FalconLinear`); quantising, LoRA and scaling subclasses fail the probe. No module of the FFN
may carry hooks (its own, or global ones), a `forward` replaced on the instance, or
parametrized tensors (`torch.nn.utils.parametrize`, `spectral_norm`, `weight_norm`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..capture._fx_private import global_module_hooks, module_hooks
from .vocabulary import projection_tensors

PROBE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
_STOCK_FORWARD_OWNERS = (("torch.nn.modules.linear", "Linear"), ("transformers.pytorch_utils", "Conv1D"))
_meta_verdicts: dict[tuple, str | None] = {}


def global_hooks_problem() -> str | None:
    """Why no FFN can be replaced while global module hooks are registered, or None."""
    kinds = global_module_hooks()
    if not kinds:
        return None
    return (f"a global module {kinds[0]} is registered (torch.nn.modules.module.register_module_*): "
            "it would run on the MoE's modules instead of the FFN's; remove it before the rewrite")


def module_problem(module: nn.Module, path: str) -> str | None:
    """Why `module` (at `path`) does more than its class's plain forward, or None."""
    kinds = module_hooks(module)
    if kinds:
        return (f"{kinds[0]} on {path}: the rewrite would drop it; remove it before the rewrite "
                "(and register it again on the MoE afterwards if needed)")
    if "forward" in vars(module):
        return (f"{path} has its forward replaced on the instance (an accelerate or patching "
                "hook?): the rewrite would drop it")
    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return (f"parametrized {names} on {path} (torch.nn.utils.parametrize, spectral_norm or "
                "weight_norm): the rewrite would copy the current value and drop the parametrization")
    return None


def projection_problem(module: nn.Module, path: str) -> str | None:
    """Why the projection `module` (nn.Linear or HF Conv1D) is not a plain linear map
    `F.linear(x, W, b)` of its own weight and bias, or None."""
    problem = module_problem(module, path)
    if problem is not None or _stock_forward(type(module)):
        return problem
    weight, bias = projection_tensors(module)
    error = _probe_error(module, weight, bias)
    if error is None or not error <= PROBE_TOLERANCE.get(weight.dtype, 1e-5):
        found = "it failed on a probe" if error is None else f"probe relative error {error:.1e}"
        return (f"{type(module).__name__} overrides forward and does not compute F.linear(x, W, b) "
                f"({found}; a quantised, LoRA or scaling projection?) at {path}")
    return None


def _stock_forward(cls: type) -> bool:
    owner = next(c for c in cls.__mro__ if "forward" in vars(c))
    return (owner.__module__, owner.__qualname__) in _STOCK_FORWARD_OWNERS


def _probe_error(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> float | None:
    """Relative max error of module(x) against F.linear(x, W, b) on a random input; None if the
    module fails. On the meta device a CPU stand-in with random weights is probed (per class and
    shape)."""
    if weight.device.type == "meta":
        key = (type(module), tuple(weight.shape), bias is not None, weight.dtype)
        if key not in _meta_verdicts:
            _meta_verdicts[key] = _probe_error(*_stand_in(module))
        return _meta_verdicts[key]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, weight.shape[1], generator=generator).to(weight)
    try:
        with torch.no_grad():
            got = module(x)
            want = F.linear(x, weight, bias)
            return float((got.double() - want.double()).abs().max() / want.double().abs().max())
    except Exception:  # noqa: BLE001 - any failure means we cannot vouch for it
        return None


def _stand_in(module: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    stand_in = copy.deepcopy(module).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in stand_in.parameters():
            tensor.copy_(torch.rand(tensor.shape, generator=generator) - 0.5)
    return (stand_in, *projection_tensors(stand_in))
