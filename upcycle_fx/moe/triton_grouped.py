"""A Triton grouped matmul that never reads back to the host, for dtypes grouped_mm lacks.

torch's `grouped_mm` runs bfloat16 on CUDA without a host sync, but float16 and float32 take
its fallback, which copies the group offsets to the host. This kernel covers them: rows are
sorted by expert; the launch grid has a static upper bound of row tiles (ceil(N/BM) + E), and
each tile finds its expert and first row from the group ends itself (a cumulative sum over E),
so no shape depends on the routing and no torch ops run around the launch (they had cost more
host time than the kernels took on the GPU). Forward and input gradient share one kernel (weights read as
[K, N] through strides); the weight gradient is a second kernel that walks each expert's rows.
Accumulation is float32; float32 inputs use IEEE products (no TF32) so results match cuBLAS fp32.
Runs under TRITON_INTERPRET=1 on the CPU, which is how the tests check it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class GroupedTiles:
    """Launch shapes: the row-tile matmul (forward and input gradient) and the weight gradient."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    num_warps: int = 4
    num_stages: int = 3
    grad_block_n: int = 64
    grad_block_k: int = 32
    grad_block_r: int = 32
    grad_num_warps: int = 4
    grad_num_stages: int = 3

    def shared_bytes(self, element_size: int) -> int:
        """Shared memory the pipelined tiles of the larger of the two kernels take."""
        matmul = self.num_stages * (self.block_m * self.block_k + self.block_k * self.block_n)
        grad = self.grad_num_stages * (self.grad_block_n * self.grad_block_r + self.grad_block_r * self.grad_block_k)
        return element_size * max(matmul, grad)


# Best of a sweep on an H100 (d=2048, d_ff=5632, E=8, T=4096, k=2; benchmarks/README.md): float16
# matmuls 5.98 -> 2.34 ms and weight gradients 5.54 -> 1.57 ms against GroupedTiles(); float32
# (IEEE products) 54 -> 46 ms and 16.5 -> 12.4 ms.
_SWEPT = {
    torch.float16: GroupedTiles(128, 256, 64, 8, 3, 128, 128, 32, 4, 4),
    torch.bfloat16: GroupedTiles(128, 256, 64, 8, 3, 128, 128, 32, 4, 4),
    torch.float32: GroupedTiles(128, 128, 32, 8, 2, 64, 128, 32, 8, 3),
}


@functools.lru_cache(maxsize=None)
def default_tiles(dtype: torch.dtype, device: torch.device) -> GroupedTiles:
    """The swept tiles for `dtype` where the device's shared memory holds them, else the small
    defaults (GPUs with ~100 KiB per block)."""
    tiles = _SWEPT.get(dtype, GroupedTiles())
    limit = shared_memory_per_block(device)
    if limit is not None and tiles.shared_bytes(torch.empty((), dtype=dtype).element_size()) > limit:
        return GroupedTiles()
    return tiles


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device: torch.device) -> int | None:
    """The most shared memory one block may use on a CUDA device (opt-in), None elsewhere."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if limit is None:
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return int(limit)


@triton.jit
def _grouped_matmul_kernel(a_ptr, b_ptr, c_ptr, group_end_ptr, num_experts, K, N,
                           stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                           IEEE: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """c[rows of tile] = a[rows] @ b[e] where b[e] is [K, N] (read through strides).

    Row tile `pid_m` finds its expert and first row itself: each expert's rows make
    ceil(rows / BLOCK_M) tiles, numbered in expert order; tiles past the last do nothing."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    es = tl.arange(0, E_PAD)
    e_ok = es < num_experts
    ends = tl.load(group_end_ptr + es, mask=e_ok, other=0)
    starts = tl.load(group_end_ptr + es - 1, mask=e_ok & (es > 0), other=0)
    tiles = tl.where(e_ok, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_ends = tl.cumsum(tiles, axis=0)
    expert = tl.sum((tile_ends <= pid_m).to(tl.int32), axis=0)
    if expert < num_experts:
        mine = es == expert
        first_row = (tl.sum(tl.where(mine, starts, 0), axis=0)
                     + (pid_m - tl.sum(tl.where(mine, tile_ends - tiles, 0), axis=0)) * BLOCK_M)
        row_end = tl.sum(tl.where(mine, ends, 0), axis=0)
        rows = first_row + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < N
        b_base = b_ptr + expert.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        c = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grouped_weight_grad_kernel(dy_ptr, x_ptr, dw_ptr, group_end_ptr, N, K,
                                stride_dym, stride_dyn, stride_xm, stride_xk,
                                stride_we, stride_wn, stride_wk,
                                IEEE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                BLOCK_R: tl.constexpr):
    """dw[e] = dy[rows of e].T @ x[rows of e] ([N, K]); zero for an expert without rows."""
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(group_end_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(group_end_ptr + expert)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = ns < N
    k_ok = ks < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        r_ok = rs < end
        dy = tl.load(dy_ptr + rs[None, :].to(tl.int64) * stride_dym + ns[:, None] * stride_dyn,
                     mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(x_ptr + rs[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(dy, x, input_precision="ieee")
        else:
            acc += tl.dot(dy, x)
    dw = dw_ptr + expert.to(tl.int64) * stride_we + ns[:, None] * stride_wn + ks[None, :] * stride_wk
    tl.store(dw, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def _matmul(a: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int, int], n_out: int,
            offsets: torch.Tensor, tiles: GroupedTiles) -> torch.Tensor:
    """Rows of `a` [M, K] grouped by `offsets` times b[e] viewed as [K, n_out]. The grid's row
    tiles are a static bound, ceil(M / BLOCK_M) + E: no shape depends on the routing."""
    out = torch.empty(a.shape[0], n_out, device=a.device, dtype=a.dtype)
    if a.shape[0] == 0:
        return out
    num_experts = offsets.numel()
    grid = (triton.cdiv(a.shape[0], tiles.block_m) + num_experts, triton.cdiv(n_out, tiles.block_n))
    _grouped_matmul_kernel[grid](a, b, out, offsets, num_experts, a.shape[1], n_out,
                                 a.stride(0), a.stride(1), *b_strides, out.stride(0), out.stride(1),
                                 IEEE=a.dtype == torch.float32, E_PAD=max(2, triton.next_power_of_2(num_experts)),
                                 BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                                 num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets, tiles):
        ctx.save_for_backward(x, weight, offsets)
        ctx.tiles = tiles
        # weight [E, N, K]; as b[e] = weight[e].T: [K, N]
        return _matmul(x, weight, (weight.stride(0), weight.stride(2), weight.stride(1)), weight.shape[1], offsets,
                       tiles)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        tiles = ctx.tiles
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dx = dy @ weight[e]: b[e] = weight[e] as [N, K]
            grad_x = _matmul(grad, weight, (weight.stride(0), weight.stride(1), weight.stride(2)),
                             weight.shape[2], offsets, tiles)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            num_experts, n, k = weight.shape
            grid = (num_experts, triton.cdiv(n, tiles.grad_block_n), triton.cdiv(k, tiles.grad_block_k))
            _grouped_weight_grad_kernel[grid](grad, x, grad_w, offsets, n, k,
                                              grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
                                              grad_w.stride(0), grad_w.stride(1), grad_w.stride(2),
                                              IEEE=x.dtype == torch.float32, BLOCK_N=tiles.grad_block_n,
                                              BLOCK_K=tiles.grad_block_k, BLOCK_R=tiles.grad_block_r,
                                              num_warps=tiles.grad_num_warps, num_stages=tiles.grad_num_stages)
        return grad_x, grad_w, None, None


def triton_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                          tiles: GroupedTiles | None = None) -> torch.Tensor:
    """y[rows of group e] = x[rows] @ weight[e].T; x [N, K] sorted by group, weight [E, N_out, K],
    offsets [E] int32 cumulative ends. Differentiable in x and weight. `tiles`: launch shapes
    (default: `default_tiles`)."""
    tiles = tiles or default_tiles(x.dtype, x.device)
    return _GroupedLinear.apply(x.contiguous(), weight, offsets.to(torch.int32).contiguous(), tiles)
