"""Which CUDA kernels a fused `com.microsoft::MoE` node launches in onnxruntime, and how long each takes.

    python benchmarks/onnx_kernels.py --tokens 512 4096 --out benchmarks/results/onnx_kernels_h100.json

Exports `onnx_gpu.py`'s Mixtral-shaped layer (d=4096, d_ff=14336, E=8, k=2, SwiGLU) fused for the
CUDA target in float16, runs it on onnxruntime's CUDA execution provider under `torch.profiler`
(CUPTI records every kernel of the process, onnxruntime's included), and prints each kernel's
time per run, beside the kernels of the PyTorch upcycled layer (same weights, float16). This is
how `benchmarks/README.md` tells what limits the fused node at a given T (which GEMM kernels
onnxruntime's build picks, and their share of the time). Needs onnxruntime-gpu and a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_gpu import GPU, Workbench, layer_inputs, to_device, torch_timer  # noqa: E402

RUNS = 10


def kernel_table(call, runs: int = RUNS) -> list[dict]:
    """Per-kernel CUDA time of one `call`, averaged over `runs` (warm), longest first."""
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        for _ in range(runs):
            call()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name][0] += event.time_range.elapsed_us()
            totals[event.name][1] += 1
    rows = [{"kernel": name, "us_per_run": us / runs, "launches_per_run": count / runs}
            for name, (us, count) in totals.items()]
    return sorted(rows, key=lambda r: -r["us_per_run"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", nargs="*", type=int, default=[512, 4096])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import onnxruntime

    result = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
              "device": torch.cuda.get_device_name(), "layers": {}}
    with tempfile.TemporaryDirectory() as scratch:
        bench = Workbench(GPU, Path(scratch))
        session = bench.session("layer", "float16", "cuda", True)[0]
        model = bench.model("layer", "float16")
        for tokens in args.tokens:
            feeds = to_device(layer_inputs(GPU, tokens), GPU, "float16")
            for name, call in (("onnxruntime fused", session.timer(feeds)), ("pytorch", torch_timer(model, feeds))):
                rows = kernel_table(call)
                total = sum(r["us_per_run"] for r in rows)
                result["layers"][f"{name} T={tokens}"] = {"total_us": total, "kernels": rows}
                print(f"\n{name}, T={tokens}: {total:.0f} us of kernels per run")
                for r in rows[:12]:
                    print(f"  {r['us_per_run']:9.1f} us {100 * r['us_per_run'] / total:5.1f}%  x{r['launches_per_run']:.0f}  "
                          f"{r['kernel'][:150]}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
