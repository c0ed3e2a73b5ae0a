"""Small-batch (decode) expert dispatch in one Triton kernel, for inference on CUDA.

At T ≤ 64 tokens a layer reads a few experts' weights and does almost no arithmetic; the
grouped path's ~15 small kernels (sort, counts, gathers, two grouped matmuls, bias, activation,
scatter-add) cost more than the reads. Here one kernel does the whole expert computation:

grid (E, d_ff tiles). A program finds the rows routed to its expert among the N assignments
(one tile of expert ids; a cumulative sum ranks them; an expert nobody chose reads nothing) and,
for its slice of the hidden units, computes h = act(x[rows] @ up[e, slice]ᵀ + b) (gated:
act(gate) · up) in registers, then h @ down[e, :, slice]ᵀ times the routing weight, added
atomically into a float32 output row per token (the down bias once, by the first slice). The
hidden activations never touch memory, every weight element is read once per launch, and the
activation is computed in the kernel by name (`activations.py` vouches for the module first).

Accumulation is float32 (IEEE products for float32 inputs). Forward only: `dispatch` takes
this path on CUDA for inference on at most `dispatch.DECODE_MAX_ROWS` assignments. Runs under
TRITON_INTERPRET=1 on the CPU, which is how the tests check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .activations import cached_probe
from .triton_grouped import shared_memory_per_block

_SHARED_BYTES = 128 * 1024  # for the up projection's pipelined tiles; an H100 has 227 KiB per block
_SHARED_SHARE = 0.75        # of a smaller GPU's per-block limit: room for the down projection's tiles
KERNEL_ACTIVATIONS = ("relu", "relu2", "silu", "sigmoid", "tanh", "gelu", "gelu_tanh", "gelu_fast", "gelu_quick")


@dataclass(frozen=True)
class DecodeTiles:
    """Launch shape: hidden units per program, model-dim chunk, warps and pipeline stages."""

    block_f: int
    block_d: int
    num_warps: int
    num_stages: int


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """The FFN activation by name, in float32 (tanh written through the sigmoid)."""
    if ACT == "relu":
        return tl.maximum(z, 0.0)
    elif ACT == "relu2":
        r = tl.maximum(z, 0.0)
        return r * r
    elif ACT == "silu":
        return z * tl.sigmoid(z)
    elif ACT == "sigmoid":
        return tl.sigmoid(z)
    elif ACT == "tanh":
        return 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == "gelu":
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == "gelu_quick":
        return z * tl.sigmoid(1.702 * z)
    else:  # gelu_tanh / gelu_fast: 0.5 z (1 + tanh(u)) = z · sigmoid(2u)
        return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))


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
                   BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[token[r]] += weight[r] · (act(x[token[r]] @ up[e, f]ᵀ + b) @ down[e, :, f]ᵀ) over the
    hidden slice f of this program, for the rows r of expert e, ROW_BLOCK of them at a time."""
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
        if UP_BIAS:
            up_b_base = up_b_ptr + expert.to(tl.int64) * stride_ube
            acc += tl.load(up_b_base + up_rows * stride_ubf, mask=f_ok, other=0.0).to(tl.float32)[None, :]
            if GATED:
                gate += tl.load(up_b_base + fs * stride_ubf, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            hidden = _activation(gate, ACT) * acc
        else:
            hidden = _activation(acc, ACT)
        hidden = tl.where(f_ok[None, :], hidden, 0.0).to(x_ptr.dtype.element_ty)
        scale = tl.load(weight_ptr + row, mask=valid, other=0.0).to(tl.float32)
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


def kernel_activation(experts) -> str | None:
    """Why the decode kernel cannot compute these experts' activation, or None if it can."""
    name = experts.activation_name
    if name not in KERNEL_ACTIVATIONS:
        return f"activation {name}: the decode kernel computes {', '.join(KERNEL_ACTIVATIONS)}"
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
    """Tiles measured best on an H100 (bf16, `benchmarks/moe_bench.py` shapes, T = 1 … 64): slices
    of 128 hidden units for narrow models once there are 16 or more assignments (fewer atomic
    adds of the output), 64 otherwise (more programs to spread the reads over the SMs);
    128-wide model-dim chunks, 4 warps, 3 pipeline stages. The model-dim chunk is halved until
    the pipelined up-projection tiles fit `_SHARED_BYTES` (float32, gated experts, many rows),
    or 3/4 of `shared_limit` (the device's per-block shared memory) where that is less."""
    block_f = 128 if d_model < 2048 and rows >= 16 else 64
    block_d, stages = 128, 3
    budget = _SHARED_BYTES if shared_limit is None else min(_SHARED_BYTES, int(_SHARED_SHARE * shared_limit))

    def shared_bytes(chunk: int) -> int:
        return stages * element_size * chunk * (row_block + (2 if gated else 1) * block_f)

    while block_d > 16 and shared_bytes(block_d) > budget:
        block_d //= 2
    return DecodeTiles(block_f=block_f, block_d=block_d, num_warps=4, num_stages=stages)


def decode_experts(x: torch.Tensor, token_idx: torch.Tensor, expert_idx: torch.Tensor, weight: torch.Tensor,
                   experts, tiles: DecodeTiles | None = None) -> torch.Tensor:
    """out[t] = Σ over assignments (t, e, w) of w · expert_e(x[t]); x: [T, D], a few assignments
    (all of them make one tile of the kernel; `dispatch` sends at most DECODE_MAX_ROWS).

    `experts`: an `upcycle_fx.moe.Experts` whose activation `kernel_activation` accepts."""
    rows = expert_idx.numel()
    num_experts, _, d_model = experts.up_proj.shape
    d_ff = experts.d_ff
    row_block = _row_block(rows, num_experts)
    tiles = tiles or default_tiles(d_model, rows, element_size=x.element_size(), gated=experts.gated,
                                   row_block=row_block, shared_limit=shared_memory_per_block(x.device))
    out = torch.zeros(x.shape[0], d_model, dtype=torch.float32, device=x.device)
    up, down = experts.up_proj, experts.down_proj
    up_b = experts.up_bias if experts.up_bias is not None else up
    down_b = experts.down_bias if experts.down_bias is not None else down
    _decode_kernel[(num_experts, triton.cdiv(d_ff, tiles.block_f))](
        x, up, up_b, down, down_b, token_idx.contiguous(), expert_idx.contiguous(), weight.contiguous(), out,
        rows, d_model, d_ff,
        x.stride(0), x.stride(1), up.stride(0), up.stride(1), up.stride(2), up_b.stride(0), up_b.stride(-1),
        down.stride(0), down.stride(1), down.stride(2), down_b.stride(0), down_b.stride(-1),
        out.stride(0), out.stride(1),
        ACT="gelu_tanh" if experts.activation_name == "gelu_fast" else experts.activation_name,
        GATED=experts.gated, UP_BIAS=experts.up_bias is not None, DOWN_BIAS=experts.down_bias is not None,
        IEEE=x.dtype == torch.float32, ROWS=max(16, triton.next_power_of_2(rows)),
        ROW_BLOCK=row_block, BLOCK_F=tiles.block_f, BLOCK_D=tiles.block_d,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out if x.dtype == torch.float32 else out.to(x.dtype)
