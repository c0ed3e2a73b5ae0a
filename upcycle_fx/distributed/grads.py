"""Gradient norms and clipping for a parallelized model, whose gradients live on two meshes.

torch's `clip_grad_norm_` needs every DTensor gradient on one mesh; with expert parallelism the
expert gradients live on the (dp_mod_ep, ep) grid and the others on the data mesh. Here the
norm is taken per mesh (each a full, all-reduced norm) and then combined.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


def _by_mesh(parameters: Iterable[torch.Tensor]) -> dict[object, list[torch.Tensor]]:
    groups: dict[object, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            key = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            groups.setdefault(key, []).append(param)
    return groups


def _total_norm(groups: dict[object, list[torch.Tensor]], norm_type: float) -> torch.Tensor:
    norms = []
    for group in groups.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(norms, norm_type)


def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients of `parameters` (full tensors, whatever their mesh), a plain
    tensor equal on every rank. Collective when gradients are DTensors."""
    return _total_norm(_by_mesh(parameters), norm_type)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over all gradients of a parallelized model; returns the
    total norm before clipping (a plain tensor, the same on every rank). Collective."""
    groups = _by_mesh(parameters)
    total = _total_norm(groups, norm_type)
    for group in groups.values():  # one foreach per mesh: DTensor ops do not mix meshes
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total
