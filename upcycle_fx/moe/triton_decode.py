"""Small-batch (decode) expert dispatch in one Triton kernel, for inference on CUDA.

At T ≤ 64 tokens a layer reads a few experts' weights and does almost no arithmetic; the
grouped path's ~15 small kernels (sort, counts, gathers, two grouped matmuls, bias, activation,
scatter-add) cost more than the reads. Here one kernel does the whole expert computation, in
one of two shapes:

* per expert (`_decode_kernel`), grid (E, d_ff tiles): a program finds the rows routed to its
  expert among the N assignments (one tile of expert ids; a cumulative sum ranks them; an
  expert nobody chose reads nothing) and, for its slice of the hidden units, computes
  h = act(x[rows] @ up[e, slice]ᵀ + b) (gated: act(gate) · up) in registers with `tl.dot`, then
  h @ down[e, :, slice]ᵀ times the routing weight, added atomically into a float32 output row
  per token (the down bias once, by the first slice). Every weight element is read once.
* per assignment (`_assignment_kernel`), grid (N, d_ff tiles), for at most
  `ASSIGNMENT_KERNEL_MAX_ROWS` assignments: a program reads its assignment's expert, token and
  weight (three independent loads, no search) and does the same computation as a matrix-vector
  product in registers. With so few rows a weight read is all there is to do, and this program
  waits on one load before streaming weights instead of three; an expert chosen twice is read
  twice (from L2, mostly). Measured on an H100 (`benchmarks/README.md`): 20% faster at N ≤ 16.

The hidden activations never touch memory, and the activation is computed in the kernel by the
Triton form its record gives (`upcycle_fx.activations`; `moe/activations.py` vouches for the
module first), passed to the kernel as a compile-time function. The float32 output is zeroed and cast by
two small Triton kernels; on Hopper and later the three launch with programmatic dependent
launch (the compute kernel streams weights while the zeroing finishes, and waits for it with
`gdc_wait` before its first atomic add; the cast waits for the compute kernel).

Accumulation is float32 (IEEE products for float32 inputs). Forward only: `dispatch` takes
this path on CUDA for inference on at most `dispatch.DECODE_MAX_ROWS` assignments. Runs under
TRITON_INTERPRET=1 on the CPU, which is how the tests check it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ..activations import activation_names, describe, triton_form
from .activations import cached_probe
from .triton_grouped import shared_memory_per_block

_SHARED_BYTES = 128 * 1024  # for the up projection's pipelined tiles; an H100 has 227 KiB per block
_SHARED_SHARE = 0.75        # of a smaller GPU's per-block limit: room for the down projection's tiles
ASSIGNMENT_KERNEL_MAX_ROWS = 16  # at most this many assignments: one program per assignment and slice
PROGRAMMATIC_LAUNCH = True       # overlap zeroing, compute and cast on Hopper+ (off: plain stream order)
_ELEMENTWISE_BLOCK = 1024


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape: hidden units per program, model-dim chunk, warps and pipeline stages; and
    which kernel: one program per (expert, slice), or per (assignment, slice)."""

    block_f: int
    block_d: int
    num_warps: int
    num_stages: int
    per_assignment: bool = False


@triton.jit
def _hidden_units(acc, gate, up_b_ptr, up_rows, fs, f_ok, stride_ubf,
                  ACT: tl.constexpr, GATED: tl.constexpr, UP_BIAS: tl.constexpr):
    """act(up + b) (gated: act(gate + b) · (up + b)) of the float32 sums `acc` (and `gate`),
    [..., BLOCK_F] for the hidden units fs, zero past d_ff; biases broadcast over any rows."""
    if UP_BIAS:
        acc += tl.load(up_b_ptr + up_rows * stride_ubf, mask=f_ok, other=0.0).to(tl.float32)
        if GATED:
            gate += tl.load(up_b_ptr + fs * stride_ubf, mask=f_ok, other=0.0).to(tl.float32)
    if GATED:
        hidden = ACT(gate) * acc
    else:
        hidden = ACT(acc)
    return tl.where(f_ok, hidden, 0.0)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


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
def _decode_kernel(x_ptr, up_ptr, up_b_ptr, down_ptr, down_b_ptr, token_ptr, expert_ptr, weight_ptr, out_ptr,
                   N, D, F,
                   stride_xt, stride_xd, stride_ue, stride_uf, stride_ud, stride_ube, stride_ubf,
                   stride_de, stride_dd, stride_df, stride_dbe, stride_dbd, stride_ot, stride_od,
                   ACT: tl.constexpr, GATED: tl.constexpr, UP_BIAS: tl.constexpr, DOWN_BIAS: tl.constexpr,
                   IEEE: tl.constexpr, ROWS: tl.constexpr, ROW_BLOCK: tl.constexpr,
                   BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """out[token[r]] += weight[r] · (act(x[token[r]] @ up[e, f]ᵀ + b) @ down[e, :, f]ᵀ) over the
    hidden slice f of this program, for the rows r of expert e, ROW_BLOCK of them at a time."""
    if PDL:
        gdc_launch_dependents()  # the cast kernel may start; it waits for this one to finish
    expert = tl.program_id(0)
    f_tile = tl.program_id(1)
    count, rank, mine = _my_rows(expert_ptr, expert, N, ROWS)
    fs = f_tile * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = fs < F
    up_base = up_ptr + expert.to(tl.int64) * stride_ue
    down_base = down_ptr + expert.to(tl.int64) * stride_de
    up_rows = fs + F if GATED else fs          # gated: up_proj holds [gate; up]
    for start in range(0, count, ROW_BLOCK):
        row, valid = _chunk_rows(rank, mine, start, count, ROWS, ROW_BLOCK)
        tokens = tl.load(token_ptr + row, mask=valid, other=0).to(tl.int64)
        acc = tl.zeros((ROW_BLOCK, BLOCK_F), dtype=tl.float32)
        gate = tl.zeros((ROW_BLOCK, BLOCK_F), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            a = tl.load(x_ptr + tokens[:, None] * stride_xt + ds[None, :] * stride_xd,
                        mask=valid[:, None] & d_ok[None, :], other=0.0)
            w_mask = d_ok[:, None] & f_ok[None, :]
            w = tl.load(up_base + ds[:, None] * stride_ud + up_rows[None, :] * stride_uf, mask=w_mask, other=0.0)
            acc = _dot(a, w, acc, IEEE)
            if GATED:
                g = tl.load(up_base + ds[:, None] * stride_ud + fs[None, :] * stride_uf, mask=w_mask, other=0.0)
                gate = _dot(a, g, gate, IEEE)
        hidden = _hidden_units(acc, gate, up_b_ptr + expert.to(tl.int64) * stride_ube, up_rows, fs, f_ok, stride_ubf,
                               ACT, GATED, UP_BIAS).to(x_ptr.dtype.element_ty)
        scale = tl.load(weight_ptr + row, mask=valid, other=0.0).to(tl.float32)
        if PDL:
            gdc_wait()  # the output's zeroing is done (returns at once after the first time)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_ok = ds < D
            w = tl.load(down_base + fs[:, None] * stride_df + ds[None, :] * stride_dd,
                        mask=f_ok[:, None] & d_ok[None, :], other=0.0)
            part = _dot(hidden, w, tl.zeros((ROW_BLOCK, BLOCK_D), dtype=tl.float32), IEEE)
            if DOWN_BIAS:
                first = (f_tile == 0).to(tl.float32)
                bias = tl.load(down_b_ptr + expert.to(tl.int64) * stride_dbe + ds * stride_dbd, mask=d_ok, other=0.0)
                part += first * bias.to(tl.float32)[None, :]
            tl.atomic_add(out_ptr + tokens[:, None] * stride_ot + ds[None, :] * stride_od, part * scale[:, None],
                          mask=valid[:, None] & d_ok[None, :], sem="relaxed")  # no ordering needed: a sum


@triton.jit
def _assignment_kernel(x_ptr, up_ptr, up_b_ptr, down_ptr, down_b_ptr, token_ptr, expert_ptr, weight_ptr, out_ptr,
                       D, F,
                       stride_xt, stride_xd, stride_ue, stride_uf, stride_ud, stride_ube, stride_ubf,
                       stride_de, stride_dd, stride_df, stride_dbe, stride_dbd, stride_ot, stride_od,
                       ACT: tl.constexpr, GATED: tl.constexpr, UP_BIAS: tl.constexpr, DOWN_BIAS: tl.constexpr,
                       BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    """out[token[j]] += weight[j] · (act(x[token[j]] @ up[e, f]ᵀ + b) @ down[e, :, f]ᵀ) for the one
    assignment j of this program and its hidden slice f; matrix-vector products in float32."""
    if PDL:
        gdc_launch_dependents()
    j = tl.program_id(0)
    f_tile = tl.program_id(1)
    expert = tl.load(expert_ptr + j).to(tl.int64)
    token = tl.load(token_ptr + j).to(tl.int64)
    scale = tl.load(weight_ptr + j).to(tl.float32)
    fs = f_tile * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = fs < F
    up_base = up_ptr + expert * stride_ue
    down_base = down_ptr + expert * stride_de
    up_rows = fs + F if GATED else fs          # gated: up_proj holds [gate; up]
    acc = tl.zeros((BLOCK_F,), dtype=tl.float32)
    gate = tl.zeros((BLOCK_F,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        w_mask = d_ok[:, None] & f_ok[None, :]
        w = tl.load(up_base + ds[:, None] * stride_ud + up_rows[None, :] * stride_uf, mask=w_mask, other=0.0)
        if GATED:
            g = tl.load(up_base + ds[:, None] * stride_ud + fs[None, :] * stride_uf, mask=w_mask, other=0.0)
        a = tl.load(x_ptr + token * stride_xt + ds * stride_xd, mask=d_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * a[:, None], axis=0)
        if GATED:
            gate += tl.sum(g.to(tl.float32) * a[:, None], axis=0)
    hidden = _hidden_units(acc, gate, up_b_ptr + expert * stride_ube, up_rows, fs, f_ok, stride_ubf,
                           ACT, GATED, UP_BIAS) * scale
    if PDL:
        gdc_wait()
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        w = tl.load(down_base + fs[:, None] * stride_df + ds[None, :] * stride_dd,
                    mask=f_ok[:, None] & d_ok[None, :], other=0.0)
        part = tl.sum(w.to(tl.float32) * hidden[:, None], axis=0)
        if DOWN_BIAS:
            first = (f_tile == 0).to(tl.float32)
            bias = tl.load(down_b_ptr + expert * stride_dbe + ds * stride_dbd, mask=d_ok, other=0.0)
            part += first * scale * bias.to(tl.float32)
        tl.atomic_add(out_ptr + token * stride_ot + ds * stride_od, part, mask=d_ok, sem="relaxed")


@triton.jit
def _zero_kernel(out_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """out[:n] = 0; lets the compute kernel launch at once (it waits before writing out)."""
    if PDL:
        gdc_launch_dependents()
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.zeros((BLOCK,), dtype=tl.float32), mask=offsets < n)


@triton.jit
def _cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """dst[:n] = src[:n] in dst's dtype, once the compute kernel before it has finished."""
    if PDL:
        gdc_wait()
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask).to(dst_ptr.dtype.element_ty), mask=mask)


def kernel_activations() -> tuple[str, ...]:
    """The activations whose records give a Triton form (`upcycle_fx.activations`)."""
    return tuple(name for name in activation_names() if triton_form(name) is not None)


def kernel_activation(experts) -> str | None:
    """Why the decode kernel cannot compute these experts' activation, or None if it can."""
    name = experts.activation_name
    if triton_form(name) is None:
        return (f"activation {describe(name)}: no Triton form in its record (the decode kernel computes "
                f"{', '.join(kernel_activations())})")
    if experts.training and experts.hidden_dropout:
        return "hidden dropout in training mode"
    return cached_probe(experts.activation, name)


def _row_block(rows: int, num_experts: int) -> int:
    """Rows of one expert computed together: room for twice the mean rows per chosen expert, so
    that most experts take one pass over their weights (16, tl.dot's smallest, up to 64)."""
    mean = rows / min(num_experts, rows)
    return min(64, max(16, triton.next_power_of_2(int(2 * mean))))


def default_tiles(d_model: int, rows: int, *, element_size: int = 2, gated: bool = False,
                  row_block: int = 16, shared_limit: int | None = None) -> DecodeTiles:
    """Tiles measured best on an H100 (bf16, `benchmarks/moe_bench.py` shapes, T = 1 … 64).

    Up to `ASSIGNMENT_KERNEL_MAX_ROWS` assignments: the per-assignment kernel, 64 hidden units per
    program (128 from d=4096), 256-wide model-dim chunks (128 in float32: its tiles live in
    registers), 8 warps. Beyond: the per-expert kernel, slices of 128 hidden units for narrow
    models (fewer atomic adds of the output; 2 pipeline stages) and 64 otherwise (3 stages),
    128-wide chunks, 4 warps. The chunk is halved until the pipelined up-projection tiles fit
    `_SHARED_BYTES` (float32, gated experts, many rows), or 3/4 of `shared_limit` (the device's
    per-block shared memory) where that is less."""
    if rows <= ASSIGNMENT_KERNEL_MAX_ROWS:
        return DecodeTiles(block_f=128 if d_model >= 4096 else 64, block_d=256 if element_size <= 2 else 128,
                           num_warps=8, num_stages=1, per_assignment=True)
    block_f = 128 if d_model < 2048 and rows >= 16 else 64
    block_d, stages = 128, 2 if block_f == 128 else 3
    budget = _SHARED_BYTES if shared_limit is None else min(_SHARED_BYTES, int(_SHARED_SHARE * shared_limit))

    def shared_bytes(chunk: int) -> int:
        return stages * element_size * chunk * (row_block + (2 if gated else 1) * block_f)

    while block_d > 16 and shared_bytes(block_d) > budget:
        block_d //= 2
    return DecodeTiles(block_f=block_f, block_d=block_d, num_warps=4, num_stages=stages)


def programmatic_launch(device: torch.device) -> bool:
    """Whether the three kernels overlap through programmatic dependent launch (Hopper and later,
    and `PROGRAMMATIC_LAUNCH`; never in Triton's interpreter)."""
    return PROGRAMMATIC_LAUNCH and device.type == "cuda" and _hopper_or_later(device)


@functools.lru_cache(maxsize=None)
def _hopper_or_later(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 9


def decode_experts(x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, weight: torch.Tensor,
                   experts, tiles: DecodeTiles | None = None) -> torch.Tensor:
    """out[t] = Σ over assignments (t, e, w) of w · expert_e(x[t]); x: [T, D], a few assignments
    (all of them make one tile of the per-expert kernel; `dispatch` sends at most DECODE_MAX_ROWS).

    `experts`: an `upcycle_fx.moe.Experts` whose activation `kernel_activation` accepts."""
    rows = expert_idx.numel()
    num_experts, _, d_model = experts.up_proj.shape
    d_ff = experts.d_ff
    row_block = _row_block(rows, num_experts)
    if rows == 0 or x.shape[0] == 0:
        return torch.zeros(x.shape[0], d_model, dtype=x.dtype, device=x.device)
    tiles = tiles or default_tiles(d_model, rows, element_size=x.element_size(), gated=experts.gated,
                                   row_block=row_block, shared_limit=shared_memory_per_block(x.device))
    pdl = programmatic_launch(x.device)
    launch = {"launch_pdl": True} if pdl else {}
    out = torch.empty(x.shape[0], d_model, dtype=torch.float32, device=x.device)
    elementwise = (triton.cdiv(out.numel(), _ELEMENTWISE_BLOCK),)
    _zero_kernel[elementwise](out, out.numel(), BLOCK=_ELEMENTWISE_BLOCK, PDL=pdl)
    up, down = experts.up_proj, experts.down_proj
    up_b = experts.up_bias if experts.up_bias is not None else up
    down_b = experts.down_bias if experts.down_bias is not None else down
    strides = (x.stride(0), x.stride(1), up.stride(0), up.stride(1), up.stride(2), up_b.stride(0), up_b.stride(-1),
               down.stride(0), down.stride(1), down.stride(2), down_b.stride(0), down_b.stride(-1),
               out.stride(0), out.stride(1))
    operands = (x, up, up_b, down, down_b, token_idx.contiguous(), expert_idx.contiguous(), weight.contiguous(), out)
    flags = dict(ACT=triton_form(experts.activation_name),
                 GATED=experts.gated, UP_BIAS=experts.up_bias is not None, DOWN_BIAS=experts.down_bias is not None,
                 BLOCK_F=tiles.block_f, BLOCK_D=tiles.block_d, PDL=pdl, num_warps=tiles.num_warps,
                 num_stages=tiles.num_stages, **launch)
    slices = triton.cdiv(d_ff, tiles.block_f)
    if tiles.per_assignment:
        _assignment_kernel[(rows, slices)](*operands, d_model, d_ff, *strides, **flags)
    else:
        _decode_kernel[(num_experts, slices)](*operands, rows, d_model, d_ff, *strides, IEEE=x.dtype == torch.float32,
                                              ROWS=max(16, triton.next_power_of_2(rows)), ROW_BLOCK=row_block, **flags)
    if x.dtype == torch.float32:
        return out
    result = torch.empty_like(out, dtype=x.dtype)
    _cast_kernel[elementwise](out, result, out.numel(), BLOCK=_ELEMENTWISE_BLOCK, PDL=pdl, **launch)
    return result
