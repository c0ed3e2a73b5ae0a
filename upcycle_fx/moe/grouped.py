"""Grouped matmul over rows sorted by expert: the kernel the ragged dispatch needs."""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs these operands without a host sync.

    CPU: float32 / bfloat16 / float16 (bfloat16 only under torch.compile). CUDA: bfloat16 (other dtypes take torch's fallback,
    which copies the offsets to the host). Sizes that break its 16-byte alignment rule are
    padded by `grouped_linear`.
    """
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cpu":  # under torch.compile its shape checks accept bfloat16 only
        compiling = torch.compiler.is_compiling()
        return x.dtype == torch.bfloat16 if compiling else x.dtype in _GROUPED_MM_DTYPES
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16
    return False


@functools.lru_cache(maxsize=None)
def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _alignment(x: torch.Tensor) -> int:
    return 16 // x.element_size()


def _padded(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   counts: torch.Tensor, *, use_grouped_mm: bool | None = None) -> torch.Tensor:
    """y[rows of group e] = x[rows of group e] @ weight[e].T for rows sorted by group.

    x: [N, in]; weight: [E, out, in] (nn.Linear layout); offsets: [E] int32 cumulative ends
    (offsets[-1] == N); counts: [E] rows per group. Uses grouped_mm where it applies (zero-padding
    `in`/`out` to its 16-byte rule when needed: exact, and a no-op for real model sizes), else
    on CUDA the Triton grouped matmul (float16/float32, no host sync), and elsewhere one matmul
    per expert, which reads `counts` on the host.
    """
    if use_grouped_mm is None:
        use_grouped_mm = grouped_mm_applies(x, weight)
    if not use_grouped_mm:
        if x.is_cuda and _triton_available():
            from .triton_grouped import triton_grouped_linear

            return triton_grouped_linear(x, weight, offsets)
        chunks = torch.split(x, counts.tolist())
        return torch.cat([chunk @ weight[e].t() for e, chunk in enumerate(chunks)], dim=0)
    multiple = _alignment(x)
    out_features, in_features = weight.shape[1:]
    pad_in = _padded(in_features, multiple) - in_features
    pad_out = _padded(out_features, multiple) - out_features
    if pad_in or pad_out:
        x = F.pad(x, (0, pad_in))
        weight = F.pad(weight, (0, pad_in, 0, pad_out))
    y = F.grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return y[:, :out_features] if pad_out else y
