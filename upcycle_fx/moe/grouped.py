"""Grouped matmul over rows sorted by expert: the one kernel the dispatch core needs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` takes these operands.

    Both need the inner and outer sizes aligned to 16 bytes (forward and backward). CPU: float32
    / bfloat16 / float16. CUDA: bfloat16 only; other CUDA dtypes use the per-expert path.
    """
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    aligned = all(size * x.element_size() % 16 == 0 for size in weight.shape[1:])
    if x.device.type == "cpu":
        return x.dtype in _GROUPED_MM_DTYPES and aligned
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and aligned
    return False


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   counts: torch.Tensor, *, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """y[rows of group e] = x[rows of group e] @ weight[e].T for rows sorted by group.

    x: [N, in]; weight: [E, out, in] (nn.Linear layout); offsets: [E] int32 cumulative ends
    (offsets[-1] == N); counts: [E] rows per group. Uses grouped_mm where it applies, else one
    matmul per expert (which reads `counts` on the host).
    """
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_applies(x, weight)
    if use_grouped_mm:
        return F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    chunks = torch.split(x, counts.tolist())
    return torch.cat([chunk @ weight[e].t() for e, chunk in enumerate(chunks)], dim=0)
