"""The measured floor of reading N bytes once from device memory: the fastest of several plain
read kernels over a contiguous buffer of that size, timed like the kernel under test.

`bytes / copy bandwidth` (moe_bench's `floor_ms`) is the asymptotic floor; a read of a few
tens of MB does not reach that bandwidth on any kernel (launch, ramp-up and the tail of the last
wave are a large share of it). This module measures what a read of exactly those bytes takes:
`torch.sum`, and a Triton streaming reduction (every load of a program issued before the first
is summed, wide vector loads) at several tile sizes. The buffer is contiguous, so the floor is
if anything lower than for the experts' weights the decode kernel reads.

    TRITON_INTERPRET=1 python benchmarks/read_floor.py      # checks the read kernel's sum (CPU)
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

# (elements per load, loads per program, warps): one tile per program, or a few unrolled
READ_CONFIGS = [(4096, 1, 4), (8192, 1, 8), (8192, 2, 8), (4096, 4, 4), (8192, 4, 8), (16384, 2, 8)]


@triton.jit
def _read_sum_kernel(src_ptr, partial_ptr, n, BLOCK: tl.constexpr, LOADS: tl.constexpr):
    """partial[program] = Σ of its LOADS·BLOCK elements (the loads are independent: unrolled)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK * LOADS
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(LOADS):
        offsets = start + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src_ptr + offsets, mask=offsets < n, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


def read_sum(src: torch.Tensor, partial: torch.Tensor, block: int, loads: int, warps: int) -> torch.Tensor:
    """Read every element of the flat `src` once; `partial` holds one float32 per program."""
    programs = triton.cdiv(src.numel(), block * loads)
    _read_sum_kernel[(programs,)](src, partial, src.numel(), BLOCK=block, LOADS=loads, num_warps=warps)
    return partial[:programs]


def read_candidates(nbytes: int, device, dtype=torch.bfloat16) -> dict[str, Callable[[], object]]:
    """Plain reads of a fresh contiguous `nbytes` buffer, by name."""
    element_size = torch.empty(0, dtype=dtype).element_size()
    src = torch.randn(nbytes // element_size, device=device).to(dtype)
    sink = torch.empty((), dtype=torch.float32, device=device)
    partial = torch.empty(triton.cdiv(src.numel(), min(b * n for b, n, _ in READ_CONFIGS)), dtype=torch.float32,
                          device=device)
    candidates = {"torch.sum": lambda: torch.sum(src, dim=0, dtype=torch.float32, out=sink)}
    for block, loads, warps in READ_CONFIGS:
        candidates[f"triton read {block}x{loads} w{warps}"] = (
            lambda b=block, n=loads, w=warps: read_sum(src, partial, b, n, w))
    return candidates


def measured_read_floor(nbytes: int, device, timer: Callable[[Callable], float | None],
                        dtype=torch.bfloat16) -> tuple[float, str]:
    """(ms, kernel): the fastest plain read of `nbytes`, each candidate timed by `timer`."""
    times = {name: timer(fn) for name, fn in read_candidates(nbytes, device, dtype).items()}
    name = min((n for n, t in times.items() if t), key=times.get)
    return times[name], name


def _check() -> None:
    """The read kernel sums what it reads (run under TRITON_INTERPRET=1 on the CPU)."""
    src = torch.randn(20_000, dtype=torch.float64).to(torch.float32)
    for block, loads, warps in [(64, 1, 4), (32, 4, 4), (128, 2, 8)]:
        partial = torch.empty(triton.cdiv(src.numel(), block * loads), dtype=torch.float32)
        got = float(read_sum(src, partial, block, loads, warps).double().sum())
        want = float(src.double().sum())
        assert abs(got - want) < 1e-3 * src.numel() ** 0.5, (block, loads, got, want)  # a skipped tile: ~√block
    print("read floor kernel OK")


if __name__ == "__main__":
    _check()
