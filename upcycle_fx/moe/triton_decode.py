"""Small-batch (decode) expert dispatch in two Triton kernels, for inference on CUDA.

At T ≤ 64 tokens the grouped path is bound by its ~15 small kernels (sort, counts, gathers, two
grouped matmuls, bias, scatter-add), not by reading the chosen experts' weights. Here the
assignments need no sorting:

1. `_decode_up_kernel`, grid (E, F_in tiles): a program finds the rows routed to its expert
   among all N ≤ `dispatch.DECODE_MAX_ROWS` (one tile of expert ids; a cumulative sum ranks
   them), and computes x[rows] @ up[e]ᵀ + bias for its F_in tile, a block of its rows at a time (an
   unchosen expert reads no weights; a chosen one computes its own rows, not all N);
2. the experts' own activation (`Experts.hidden`, so every activation and gate form works);
3. `_decode_down_kernel`, grid (E, D tiles, F splits): hidden @ down[e]ᵀ (+ bias), times the
   routing weight, atomically added into a float32 output per token.

Each weight element is read once per launch, by the one program of its expert and tile.
Accumulation is float32 (IEEE products for float32 inputs). Forward only: `dispatch` takes this path
on CUDA for inference with at most 128 assignments (T·k), and the grouped path otherwise. Runs under
TRITON_INTERPRET=1 on the CPU, which is how the tests check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_UP_BLOCK_F, _UP_BLOCK_D = 32, 64
_DOWN_BLOCK_D, _DOWN_BLOCK_F = 32, 64
_TARGET_PROGRAMS = 512  # enough programs in flight to keep an H100's memory system busy


@triton.jit
def _my_rows(expert_ptr, expert, N, ROWS: tl.constexpr):
    """The assignments of `expert` among the N ≤ ROWS: (count, rank of each row among them, mask)."""
    rows = tl.arange(0, ROWS)
    mine = tl.load(expert_ptr + rows, mask=rows < N, other=-1) == expert
    flags = mine.to(tl.int32)
    return tl.sum(flags, axis=0), tl.cumsum(flags, axis=0) - 1, mine


@triton.jit
def _chunk_rows(rank, mine, start, count, ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr):
    """Rows start … start+ROW_BLOCK−1 of this expert (by rank): their indices and validity."""
    slot = start + tl.arange(0, ROW_BLOCK)
    match = (rank[None, :] == slot[:, None]) & mine[None, :]
    row = tl.sum(tl.where(match, tl.arange(0, ROWS)[None, :], 0), axis=1)
    return row, slot < count


@triton.jit
def _decode_up_kernel(x_ptr, w_ptr, b_ptr, token_ptr, expert_ptr, out_ptr, N, D, F_IN,
                      stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_be, stride_bf,
                      stride_om, stride_of,
                      HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr,
                      BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[r, f-tile] = x[token[r]] @ w[e, f-tile, :]ᵀ + b[e, f-tile] for the rows r of expert e,
    ROW_BLOCK of them at a time (an expert with no rows does nothing)."""
    expert = tl.program_id(0)
    count, rank, mine = _my_rows(expert_ptr, expert, N, ROWS)
    fs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = fs < F_IN
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    for start in range(0, count, ROW_BLOCK):
        row, valid = _chunk_rows(rank, mine, start, count, ROWS, ROW_BLOCK)
        tokens = tl.load(token_ptr + row, mask=valid, other=0).to(tl.int64)
        acc = tl.zeros((ROW_BLOCK, BLOCK_F), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a = tl.load(x_ptr + tokens[:, None] * stride_xt + ds[None, :] * stride_xd,
                        mask=valid[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(w_base + ds[:, None] * stride_wd + fs[None, :] * stride_wf,
                        mask=d_ok[:, None] & f_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if HAS_BIAS:
            bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + fs * stride_bf, mask=f_ok, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        tl.store(out_ptr + row[:, None].to(tl.int64) * stride_om + fs[None, :] * stride_of,
                 acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & f_ok[None, :])


@triton.jit
def _decode_down_kernel(h_ptr, w_ptr, b_ptr, token_ptr, expert_ptr, weight_ptr, out_ptr, N, D, F,
                        F_PER_SPLIT, stride_hm, stride_hf, stride_we, stride_wd, stride_wf,
                        stride_be, stride_bd, stride_ot, stride_od,
                        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr):
    """out[token[r], d-tile] += weight[r] · (h[r, f-split] @ w[e, d-tile, f-split]ᵀ (+ b[e, d-tile]
    on the first split)) for the rows r of expert e, ROW_BLOCK of them at a time."""
    expert = tl.program_id(0)
    split = tl.program_id(2)
    count, rank, mine = _my_rows(expert_ptr, expert, N, ROWS)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    f_start = split * F_PER_SPLIT
    for start in range(0, count, ROW_BLOCK):
        row, valid = _chunk_rows(rank, mine, start, count, ROWS, ROW_BLOCK)
        acc = tl.zeros((ROW_BLOCK, BLOCK_D), dtype=tl.float32)
        for f0 in range(0, F_PER_SPLIT, BLOCK_F):
            fs = f_start + f0 + tl.arange(0, BLOCK_F)
            f_ok = fs < F
            a = tl.load(h_ptr + row[:, None].to(tl.int64) * stride_hm + fs[None, :] * stride_hf,
                        mask=valid[:, None] & f_ok[None, :], other=0.0)
            b = tl.load(w_base + fs[:, None] * stride_wf + ds[None, :] * stride_wd,
                        mask=f_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if HAS_BIAS:
            first = (split == 0).to(tl.float32)
            bias = tl.load(b_ptr + expert.to(tl.int64) * stride_be + ds * stride_bd, mask=d_ok, other=0.0)
            acc += first * bias.to(tl.float32)[None, :]
        scale = tl.load(weight_ptr + row, mask=valid, other=0.0).to(tl.float32)
        tokens = tl.load(token_ptr + row, mask=valid, other=0).to(tl.int64)
        tl.atomic_add(out_ptr + tokens[:, None] * stride_ot + ds[None, :] * stride_od, acc * scale[:, None],
                      mask=valid[:, None] & d_ok[None, :])


def _rows_tile(rows: int) -> int:
    return max(16, triton.next_power_of_2(rows))


def _row_block(rows: int, num_experts: int) -> int:
    """Rows of one expert computed together: room for twice the mean rows per chosen expert, so
    that most experts take one pass over their weights (16, tl.dot's smallest, up to 64)."""
    mean = rows / min(num_experts, rows)
    return min(64, max(16, triton.next_power_of_2(int(2 * mean))))


def _down_splits(num_experts: int, rows: int, d_model: int, d_ff: int) -> int:
    """F splits of the down projection: enough programs for the experts that can be active."""
    active = min(num_experts, rows)
    d_tiles = triton.cdiv(d_model, _DOWN_BLOCK_D)
    wanted = triton.cdiv(_TARGET_PROGRAMS, active * d_tiles)
    return max(1, min(wanted, triton.cdiv(d_ff, _DOWN_BLOCK_F)))


def decode_experts(x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, weight: torch.Tensor,
                   experts) -> torch.Tensor:
    """out[t] = Σ over assignments (t, e, w) of w · expert_e(x[t]); x: [T, D], a few assignments
    (all of them make one tile of the kernels; `dispatch` sends at most 128).

    `experts`: an `upcycle_fx.moe.Experts` (stacked weights, `hidden` for the activation)."""
    rows = expert_idx.numel()
    num_experts, up_rows, d_model = experts.up_proj.shape
    d_ff = experts.down_proj.shape[2]
    tile, row_block = _rows_tile(rows), _row_block(rows, num_experts)
    ieee = x.dtype == torch.float32
    token_idx = token_idx.contiguous()
    expert_idx = expert_idx.contiguous()
    up_bias, down_bias = experts.up_bias, experts.down_bias

    up_out = torch.empty(rows, up_rows, dtype=x.dtype, device=x.device)
    w = experts.up_proj
    b = up_bias if up_bias is not None else w
    _decode_up_kernel[(num_experts, triton.cdiv(up_rows, _UP_BLOCK_F))](
        x, w, b, token_idx, expert_idx, up_out, rows, d_model, up_rows,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        b.stride(0), b.stride(-1), up_out.stride(0), up_out.stride(1),
        HAS_BIAS=up_bias is not None, IEEE=ieee, ROWS=tile, ROW_BLOCK=row_block,
        BLOCK_F=_UP_BLOCK_F, BLOCK_D=_UP_BLOCK_D)

    hidden = experts.hidden(up_out)
    out = torch.zeros(x.shape[0], d_model, dtype=torch.float32, device=x.device)
    w = experts.down_proj
    b = down_bias if down_bias is not None else w
    splits = _down_splits(num_experts, rows, d_model, d_ff)
    per_split = triton.cdiv(triton.cdiv(d_ff, splits), _DOWN_BLOCK_F) * _DOWN_BLOCK_F
    _decode_down_kernel[(num_experts, triton.cdiv(d_model, _DOWN_BLOCK_D), triton.cdiv(d_ff, per_split))](
        hidden, w, b, token_idx, expert_idx, weight.contiguous(), out, rows, d_model, d_ff, per_split,
        hidden.stride(0), hidden.stride(1), w.stride(0), w.stride(1), w.stride(2),
        b.stride(0), b.stride(-1), out.stride(0), out.stride(1),
        HAS_BIAS=down_bias is not None, IEEE=ieee, ROWS=tile, ROW_BLOCK=row_block,
        BLOCK_D=_DOWN_BLOCK_D, BLOCK_F=_DOWN_BLOCK_F)
    return out.to(x.dtype)
