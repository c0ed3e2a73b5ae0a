"""Tile sweep of the Triton grouped matmul (`upcycle_fx/moe/triton_grouped.py`) on a GPU.

    python benchmarks/grouped_tiles_sweep.py --out benchmarks/results/triton_grouped_sweep_h100.json

The float16 and float32 training path (bf16 takes `grouped_mm`) at d=2048, d_ff=5632 (gated),
E=8, T=4096, k=2 with balanced random routing: each candidate times the four row-tile matmuls
of a forward and input gradient (up and down projections) and, separately, the two weight
gradients; the table gives ms and the speed-up over `GroupedTiles()` (the small fallback tiles)
measured in the same run. `triton_grouped._SWEPT` holds the winners; rerun on another GPU to
re-tune. Every candidate's output is compared with the first one's (relative max difference).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import astuple, fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from upcycle_fx.moe import triton_grouped as tg  # noqa: E402
from upcycle_fx.moe.triton_grouped import GroupedTiles  # noqa: E402

E, D, F, ROWS = 8, 2048, 5632, 8192
MATMUL = {torch.float16: [(64, 64, 32, 4, 3), (128, 128, 32, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
                          (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (256, 128, 64, 8, 3)],
          torch.float32: [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 2),
                          (128, 128, 16, 8, 3)]}
GRAD = {torch.float16: [(64, 32, 32, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3),
                        (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (128, 128, 32, 4, 4)],
        torch.float32: [(64, 32, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (128, 128, 32, 8, 2)]}


def tiles_with(matmul=None, grad=None) -> GroupedTiles:
    values = list(astuple(GroupedTiles()))
    if matmul:
        values[:5] = matmul
    if grad:
        values[5:] = grad
    return GroupedTiles(*values)


def operands(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.multinomial(torch.ones(E), ROWS, replacement=True, generator=torch.Generator().manual_seed(0))
    ends = counts.bincount(minlength=E).cumsum(0).to(torch.int32).cuda()

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)
    up, down = randn(E, 2 * F, D, scale=D ** -0.5), randn(E, D, F, scale=F ** -0.5)
    return ends, {"x_up": randn(ROWS, D), "x_down": randn(ROWS, F), "dy_up": randn(ROWS, 2 * F),
                  "dy_down": randn(ROWS, D), "up": up, "down": down}


def matmuls(t: dict, ends, tiles: GroupedTiles):
    """Forward and input-gradient matmuls of both projections."""
    up, down = t["up"], t["down"]
    forward = (up.stride(0), up.stride(2), up.stride(1)), (down.stride(0), down.stride(2), down.stride(1))
    backward = (up.stride(0), up.stride(1), up.stride(2)), (down.stride(0), down.stride(1), down.stride(2))
    return [tg._matmul(t["x_up"], up, forward[0], 2 * F, ends, tiles),
            tg._matmul(t["x_down"], down, forward[1], D, ends, tiles),
            tg._matmul(t["dy_up"], up, backward[0], D, ends, tiles),
            tg._matmul(t["dy_down"], down, backward[1], F, ends, tiles)]


def weight_grads(t: dict, ends, tiles: GroupedTiles):
    outs = []
    for dy, x, w in ((t["dy_up"], t["x_up"], t["up"]), (t["dy_down"], t["x_down"], t["down"])):
        dw = torch.empty_like(w)
        n, k = w.shape[1], w.shape[2]
        grid = (E, -(-n // tiles.grad_block_n), -(-k // tiles.grad_block_k))
        tg._grouped_weight_grad_kernel[grid](
            dy, x, dw, ends, n, k, dy.stride(0), dy.stride(1), x.stride(0), x.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2), IEEE=x.dtype == torch.float32,
            BLOCK_N=tiles.grad_block_n, BLOCK_K=tiles.grad_block_k, BLOCK_R=tiles.grad_block_r,
            num_warps=tiles.grad_num_warps, num_stages=tiles.grad_num_stages)
        outs.append(dw)
    return outs


def sweep(dtype) -> list[dict]:
    from triton.testing import do_bench

    ends, t = operands(dtype)
    rows = []
    for kind, candidates, run in (("matmul", MATMUL[dtype], matmuls), ("weight grad", GRAD[dtype], weight_grads)):
        reference, baseline = None, None
        for candidate in [None] + candidates:
            tiles = tiles_with(**({"matmul": candidate} if kind == "matmul" else {"grad": candidate}))
            try:
                outs = run(t, ends, tiles)
                reference = reference or [o.float() for o in outs]
                diff = max(float((o.float() - r).abs().max() / r.abs().max()) for o, r in zip(outs, reference))
                ms = do_bench(lambda: run(t, ends, tiles), warmup=5, rep=40, return_mode="median")
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory
                print(f"{dtype} {kind} {candidate}: failed: {str(error)[:100]}")
                continue
            baseline = baseline or ms
            rows.append({"dtype": str(dtype), "kernel": kind, "tiles": candidate or "GroupedTiles()", "ms": ms,
                         "speedup": baseline / ms, "max_rel_diff": diff})
            print(f"| {dtype} | {kind} | {candidate or 'GroupedTiles()'} | {ms:.2f} | {baseline / ms:.2f}x | {diff:.0e} |",
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [f.name for f in fields(GroupedTiles)]
    print(f"tiles: matmul {names[:5]}, weight grad {names[5:]}\n")
    print("| dtype | kernel | tiles | ms | speed-up vs GroupedTiles() | max rel. diff |\n|---|---|---|---:|---:|---:|")
    rows = sweep(torch.float16) + sweep(torch.float32)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
