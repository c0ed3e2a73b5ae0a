"""A Triton grouped matmul that never reads back to the host, for dtypes grouped_mm lacks.

torch's `grouped_mm` runs bfloat16 on CUDA without a host sync, but float16 and float32 take
its fallback, which copies the group offsets to the host. This kernel covers them: rows are
sorted by expert; the launch grid has a static upper bound of row tiles (ceil(N/BM) + E), and
each tile looks up its expert and first row in small device tables built with torch ops, so no
shape depends on the routing. Forward and input gradient share one kernel (weights read as
[K, N] through strides); the weight gradient is a second kernel that walks each expert's rows.
Accumulation is float32; float32 inputs use IEEE products (no TF32) so results match cuBLAS fp32.
Runs under TRITON_INTERPRET=1 on the CPU, which is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_M, _BLOCK_N, _BLOCK_K = 64, 64, 32


@triton.jit
def _grouped_matmul_kernel(a_ptr, b_ptr, c_ptr, tile_expert_ptr, tile_row_ptr, group_end_ptr,
                           num_experts, K, N,
                           stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
                           IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """c[rows of tile] = a[rows] @ b[e] where b[e] is [K, N] (read through strides)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(tile_expert_ptr + pid_m)
    if expert < num_experts:
        first_row = tl.load(tile_row_ptr + pid_m)
        row_end = tl.load(group_end_ptr + expert)
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


def _tile_tables(offsets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per row-tile: its expert (E = no work) and first row; sized by a static bound."""
    num_experts = offsets.numel()
    ends = offsets.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    tiles = (ends - starts + _BLOCK_M - 1) // _BLOCK_M
    tile_ends = tiles.cumsum(0)
    max_tiles = -(-rows // _BLOCK_M) + num_experts
    tile = torch.arange(max_tiles, device=offsets.device)
    expert = torch.searchsorted(tile_ends, tile, right=True)
    safe = expert.clamp(max=num_experts - 1)
    first_tile = tile_ends[safe] - tiles[safe]
    first_row = starts[safe] + (tile - first_tile) * _BLOCK_M
    return expert.to(torch.int32), first_row.to(torch.int32), max_tiles


def _matmul(a: torch.Tensor, b: torch.Tensor, b_strides: tuple[int, int, int], n_out: int,
            offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `a` [M, K] grouped by `offsets` times b[e] viewed as [K, n_out]."""
    out = torch.empty(a.shape[0], n_out, device=a.device, dtype=a.dtype)
    if a.shape[0] == 0:
        return out
    expert, first_row, max_tiles = _tile_tables(offsets, a.shape[0])
    grid = (max_tiles, triton.cdiv(n_out, _BLOCK_N))
    _grouped_matmul_kernel[grid](a, b, out, expert, first_row, offsets, offsets.numel(), a.shape[1], n_out,
                                 a.stride(0), a.stride(1), *b_strides, out.stride(0), out.stride(1),
                                 IEEE=a.dtype == torch.float32, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N,
                                 BLOCK_K=_BLOCK_K)
    return out


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offsets):
        ctx.save_for_backward(x, weight, offsets)
        # weight [E, N, K]; as b[e] = weight[e].T: [K, N]
        return _matmul(x, weight, (weight.stride(0), weight.stride(2), weight.stride(1)), weight.shape[1], offsets)

    @staticmethod
    def backward(ctx, grad):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # dx = dy @ weight[e]: b[e] = weight[e] as [N, K]
            grad_x = _matmul(grad, weight, (weight.stride(0), weight.stride(1), weight.stride(2)),
                             weight.shape[2], offsets)
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(weight)
            num_experts, n, k = weight.shape
            grid = (num_experts, triton.cdiv(n, _BLOCK_N), triton.cdiv(k, _BLOCK_K))
            _grouped_weight_grad_kernel[grid](grad, x, grad_w, offsets, n, k,
                                              grad.stride(0), grad.stride(1), x.stride(0), x.stride(1),
                                              grad_w.stride(0), grad_w.stride(1), grad_w.stride(2),
                                              IEEE=x.dtype == torch.float32, BLOCK_N=_BLOCK_N,
                                              BLOCK_K=_BLOCK_K, BLOCK_R=32)
        return grad_x, grad_w, None


def triton_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """y[rows of group e] = x[rows] @ weight[e].T; x [N, K] sorted by group, weight [E, N_out, K],
    offsets [E] int32 cumulative ends. Differentiable in x and weight."""
    return _GroupedLinear.apply(x.contiguous(), weight, offsets.to(torch.int32).contiguous())
