"""The decode path's two choices, measured against each other on a GPU in one run.

    python benchmarks/decode_variants.py --out benchmarks/results/decode_variants_h100.json

For the moe_bench shapes at T = 1 … 64 (bf16, the same random top-k routing as moe_bench), CUDA-
graph replays of `triton_decode.decode_experts` (zeroing, compute and cast kernels) with:
* the per-assignment kernel and the per-expert kernel (each at its default tiles), whichever
  `default_tiles` would pick for that many assignments;
* programmatic dependent launch on and off (`triton_decode.PROGRAMMATIC_LAUNCH`).
Every variant's output is compared with the float32 loop oracle before it is timed. The table
gives µs and each variant's time over the measured read floor of the same bytes
(`read_floor.py`), which is what `default_tiles` and `ASSIGNMENT_KERNEL_MAX_ROWS` were chosen by.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.moe_bench import SHAPES, as_routing, graph_replay_ms, make_experts, make_routing  # noqa: E402
from benchmarks.read_floor import measured_read_floor  # noqa: E402
from upcycle_fx.moe import triton_decode  # noqa: E402
from upcycle_fx.moe.dispatch import dispatch  # noqa: E402

TOKENS = {"mixtral": (1, 16), "small-e8": (1, 2, 4, 8, 16, 64), "small-e32": (1, 16, 64), "fine-e64": (1, 2, 16, 64)}


def variants(shape, rows: int, element_size: int, device) -> dict:
    """Name -> (tiles, programmatic launch)."""
    common = dict(element_size=element_size, gated=shape.gated)
    per_assignment = triton_decode.default_tiles(shape.d_model, 1, **common)
    per_expert = triton_decode.default_tiles(
        shape.d_model, max(rows, triton_decode.ASSIGNMENT_KERNEL_MAX_ROWS + 1), **common,
        row_block=triton_decode._row_block(rows, shape.num_experts),
        shared_limit=triton_decode.shared_memory_per_block(device))
    return {"per-assignment": (per_assignment, True), "per-expert": (per_expert, True),
            "default, no programmatic launch": (None, False)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    rows_out = []
    print("| shape | T | assignments | default picks | read floor (µs) | variant | µs | / read floor |")
    print("|---|---:|---:|---|---:|---|---:|---:|")
    for shape in SHAPES:
        experts = make_experts(shape, device, torch.bfloat16).eval()
        for tokens in TOKENS[shape.name]:
            index, weights = make_routing(shape, tokens, device)
            routing = as_routing(index, weights, shape.num_experts)
            x = torch.randn(tokens, shape.d_model, device=device, dtype=torch.bfloat16)
            rows = tokens * shape.top_k
            used = int(torch.unique(index).numel())
            with torch.no_grad():
                floor_ms, _ = measured_read_floor(used * shape.expert_bytes(2), device,
                                                  lambda fn: graph_replay_ms(fn, device))
                oracle = dispatch(x.float(), routing, make_experts(shape, device, torch.float32).eval(), "loop")
                picks = "per-assignment" if rows <= triton_decode.ASSIGNMENT_KERNEL_MAX_ROWS else "per-expert"
                record = {"shape": shape.name, "tokens": tokens, "assignments": rows, "default": picks,
                          "read_floor_us": floor_ms * 1e3, "us": {}, "error": {}}
                for name, (tiles, pdl) in variants(shape, rows, 2, device).items():
                    triton_decode.PROGRAMMATIC_LAUNCH = pdl

                    def run(tiles=tiles):
                        return triton_decode.decode_experts(x, routing.token_idx, routing.expert_idx, routing.weight,
                                                            experts, tiles)
                    out = run()
                    record["error"][name] = float((out.float() - oracle).norm() / oracle.norm())
                    assert record["error"][name] < 2e-2, (shape.name, tokens, name, record["error"][name])
                    record["us"][name] = graph_replay_ms(run, device) * 1e3
                    print(f"| {shape.name} | {tokens} | {rows} | {picks} | {floor_ms * 1e3:.1f} | {name} | "
                          f"{record['us'][name]:.1f} | {record['us'][name] / (floor_ms * 1e3):.2f}x |", flush=True)
                triton_decode.PROGRAMMATIC_LAUNCH = True
            rows_out.append(record)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                        "rows": rows_out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
