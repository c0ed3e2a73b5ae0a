"""Peak memory and speed of the streaming checkpoint conversion (`upcycle_fx.convert_checkpoint`).

Makes a Llama-shaped checkpoint with random weights locally (sharded safetensors, written
tensor by tensor so that making it does not need the memory it is meant to test), converts it
in a child process, and reports seconds, GB/s and the child's peak resident memory (from
`os.wait4`, i.e. getrusage of that child), next to the issue's bound 2 x largest input shard +
1 GB and to the peak of the same conversion of a tiny 2-layer model (imports, planning: the
fixed part). Sizes are decimal (1 GB = 1e9 bytes). Everything it writes is deleted at the end
(unless --keep).

The driver itself imports neither torch nor upcycle_fx: a child's ru_maxrss starts from its
parent's resident size at fork (Linux keeps the larger of the pre-exec and post-exec peaks), so
a driver holding a model would inflate the figure. The child also reports its own VmHWM.

    python benchmarks/convert_memory.py                 # 1.1B parameters (TinyLlama shape), bf16
    python benchmarks/convert_memory.py --preset small --dtype float32 --shard-mb 4 --experts 4
                                                        # ~60 MB: what the CI test runs
    python benchmarks/convert_memory.py --check         # also the written-output check
    python benchmarks/convert_memory.py --preset 246m --check --load-both
                                                        # and the whole-model check it replaces
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PRESETS = {
    # TinyLlama-1.1B's shape: 1,100,048,384 parameters.
    "1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    # The same layers, twice as many: peak memory must not change.
    "2.2b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=44,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    # A 246M-parameter Llama (d=1024, 16 layers, 32k vocab).
    "246m": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
}
GB = 1e9


def make_checkpoint(directory: Path, shape: dict, *, dtype: str, max_shard_bytes: int, seed: int = 0) -> int:
    """A LlamaForCausalLM checkpoint of `shape` with random weights, written one tensor at a time
    through the same shard writer as the conversion. Returns the parameter count."""
    import torch
    import transformers

    from upcycle_fx.exporters.shards import ShardWriter
    from upcycle_fx.exporters.state import tensor_table

    dtype = getattr(torch, dtype)
    config = transformers.LlamaConfig(**shape, dtype=dtype)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        table = tensor_table(transformers.LlamaForCausalLM(config))
    skip = set(table.non_persistent)
    entries = [(n, tuple(t.shape), dtype) for n, t in table.tensors.items() if n not in skip]
    directory.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(directory, [[entry] for entry in entries], max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    for name, shape_, _ in entries:
        if name.endswith("norm.weight"):
            value = torch.ones(shape_, dtype=dtype)
        else:
            value = torch.randn(shape_, generator=generator).mul_(0.02).to(dtype)
        writer.add({name: value})
    writer.close()
    config.save_pretrained(directory)
    return sum(t.numel() for n, t in table.tensors.items() if n not in skip)


def _vm_hwm() -> int:
    """This process's own peak resident size since exec (Linux), in bytes; 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class Measured:
    seconds: float
    peak_rss: int          # bytes
    result: dict


_CONVERT = """
import json, sys
sys.path.insert(0, sys.argv[5])
from convert_memory import _vm_hwm
from upcycle_fx import UpcycleConfig
from upcycle_fx.exporters.streaming import convert_checkpoint
src, out, fmt, experts = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
r = convert_checkpoint(src, out, UpcycleConfig(num_experts=experts, top_k=2, seed=0), format=fmt)
print(json.dumps({"architecture": r.architecture, "params_before": r.params_before,
                  "params_after": r.params_after, "bytes_read": r.bytes_read,
                  "bytes_written": r.bytes_written, "shards": len(r.shards),
                  "largest_input_shard": r.largest_input_shard, "seconds_inside": r.seconds,
                  "vm_hwm": _vm_hwm()}))
"""

_CHECK = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
from convert_memory import _vm_hwm
from upcycle_fx.exporters.written_check import check_written
start = time.perf_counter()
r = check_written(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"error": r.max_relative_error, "tolerance": r.tolerance, "dtype": str(r.dtype),
                  "layers_checked": r.layers_checked, "tensors_compared": r.tensors_compared,
                  "seconds_inside": time.perf_counter() - start, "vm_hwm": _vm_hwm()}))
"""

_LOAD_BOTH = """
import json, sys, time
sys.path.insert(0, sys.argv[4])
from convert_memory import _vm_hwm
import torch, transformers, upcycle_fx
from upcycle_fx.report import relative_error
start = time.perf_counter()
dense = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto").eval()
written = (transformers.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype="auto") if sys.argv[3] == "hf"
           else upcycle_fx.load(sys.argv[2])).eval()
ids = torch.randint(4, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    error = relative_error(written(input_ids=ids).logits.float(), dense(input_ids=ids).logits.float())
print(json.dumps({"error": error, "seconds_inside": time.perf_counter() - start, "vm_hwm": _vm_hwm()}))
"""

_MAKE = """
import json, sys
sys.path.insert(0, sys.argv[5])
from convert_memory import PRESETS, make_checkpoint
params = make_checkpoint(__import__("pathlib").Path(sys.argv[1]), PRESETS[sys.argv[2]], dtype=sys.argv[3],
                         max_shard_bytes=int(sys.argv[4]))
print(json.dumps({"params": params}))
"""


def in_child(code: str, *args: object) -> Measured:
    """Run `code` in a fresh interpreter; its wall time, peak RSS (os.wait4) and last JSON line."""
    here = str(Path(__file__).resolve().parent)
    with tempfile.TemporaryFile("w+") as stdout:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", code, *map(str, args), here],
                                 stdout=stdout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        stdout.seek(0)
        text = stdout.read()
    if child.returncode != 0:
        raise RuntimeError(f"child {args} failed (exit {child.returncode}):\n{text}")
    rss_unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return Measured(seconds, usage.ru_maxrss * rss_unit, json.loads(text.strip().splitlines()[-1]))


def run(preset: str, *, experts: int, format: str, dtype: str, shard_bytes: int, workdir: Path,
        keep: bool = False, check: bool = False, load_both: bool = False) -> dict:
    """Make the checkpoints, convert them (each step in its own child), report; `base` kept with
    --keep. `check`: also measure `check_written` on the output (and the tiny one's); `load_both`:
    also the check it replaces (both models loaded whole, logits compared)."""
    base = Path(tempfile.mkdtemp(prefix="convert_memory-", dir=workdir))
    try:
        made = in_child(_MAKE, base / "dense", preset, dtype, shard_bytes)
        in_child(_MAKE, base / "tiny", "tiny", dtype, shard_bytes)
        fixed = in_child(_CONVERT, base / "tiny", base / "tiny-out", format, experts)
        big = in_child(_CONVERT, base / "dense", base / "out", format, experts)
        params, r = made.result["params"], big.result
        bound = 2 * r["largest_input_shard"] + 10**9  # the bound: 2 x largest shard + 1 GB
        checked = {}
        if check:
            tiny_check = in_child(_CHECK, base / "tiny", base / "tiny-out", format)
            done = in_child(_CHECK, base / "dense", base / "out", format)
            checked = {"check_seconds": done.seconds, "check_peak_rss": done.peak_rss,
                       "check_vm_hwm": done.result["vm_hwm"], "check_error": done.result["error"],
                       "check_layers": done.result["layers_checked"], "check_tensors": done.result["tensors_compared"],
                       "check_within_bound": done.peak_rss < bound, "check_peak_rss_tiny_model": tiny_check.peak_rss}
        if load_both:
            both = in_child(_LOAD_BOTH, base / "dense", base / "out", format)
            checked.update(load_both_seconds=both.seconds, load_both_peak_rss=both.peak_rss,
                           load_both_error=both.result["error"])
        return {**checked,
            "workdir": str(base), "preset": preset, "dtype": dtype, "experts": experts, "format": format,
            "architecture": r["architecture"], "params_before": params, "params_after": r["params_after"],
            "input_bytes": r["bytes_read"], "largest_input_shard": r["largest_input_shard"],
            "output_bytes": r["bytes_written"], "output_shards": r["shards"],
            "seconds": big.seconds, "seconds_inside": r["seconds_inside"],
            "write_gb_per_s": r["bytes_written"] / GB / r["seconds_inside"],
            "read_write_gb_per_s": (r["bytes_read"] + r["bytes_written"]) / GB / r["seconds_inside"],
            "peak_rss": big.peak_rss, "vm_hwm": r["vm_hwm"], "bound": bound, "within_bound": big.peak_rss < bound,
            "peak_rss_tiny_model": fixed.peak_rss, "make_seconds": made.seconds,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {_memory()}, Python {platform.python_version()}",
            "date": time.strftime("%Y-%m-%d"),
        }
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def _memory() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kib / 1024**2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        return "RAM unknown"


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def render(m: dict) -> str:
    rows = [
        ("model", f"Llama-shaped {m['params_before'] / 1e9:.3f}B params, {m['dtype']}, random weights"),
        ("input", f"{_size(m['input_bytes'])} in shards of <= {_size(m['largest_input_shard'])}"),
        ("output", f"{m['architecture']} ({m['format']}), {m['experts']} experts, every other layer: "
                   f"{m['params_after'] / 1e9:.2f}B params, {_size(m['output_bytes'])}, "
                   f"{m['output_shards']} shards"),
        ("wall time (child process)", f"{m['seconds']:.1f} s ({m['seconds_inside']:.1f} s in convert_checkpoint)"),
        ("throughput", f"{m['write_gb_per_s']:.2f} GB/s written, {m['read_write_gb_per_s']:.2f} GB/s read+written"),
        ("peak RSS", f"{_size(m['peak_rss'])} (VmHWM {_size(m['vm_hwm'])}; bound 2 x largest shard + 1 GB = "
                     f"{_size(m['bound'])}: {'within' if m['within_bound'] else 'EXCEEDED'})"),
        ("peak RSS, same conversion of a 2-layer model", _size(m["peak_rss_tiny_model"])),
    ]
    if "check_peak_rss" in m:
        rows += [
            ("check_written (layer by layer, float32)",
             f"{m['check_seconds']:.1f} s, peak RSS {_size(m['check_peak_rss'])} "
             f"({'within' if m['check_within_bound'] else 'EXCEEDED'} the bound; 2-layer model: "
             f"{_size(m['check_peak_rss_tiny_model'])}), max relative error {m['check_error']:.1e} over "
             f"{m['check_layers']} MoE layers and {m['check_tensors']} other tensors"),
        ]
    if "load_both_peak_rss" in m:
        rows += [("check by loading both models whole",
                  f"{m['load_both_seconds']:.1f} s, peak RSS {_size(m['load_both_peak_rss'])}, "
                  f"logits error {m['load_both_error']:.1e} ({m['dtype']})")]
    rows += [
        ("machine", f"{m['machine']}, {m['date']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.1b")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--format", choices=["native", "hf"], default="native")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--shard-mb", type=int, default=500, help="input shard size in MB (output: the same)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete)")
    parser.add_argument("--check", action="store_true", help="also measure the written-output check")
    parser.add_argument("--load-both", action="store_true",
                        help="also measure the whole-model check (both models loaded: needs their memory)")
    args = parser.parse_args()
    figures = run(args.preset, experts=args.experts, format=args.format, dtype=args.dtype,
                  shard_bytes=args.shard_mb * 10**6, workdir=args.workdir, keep=args.keep, check=args.check,
                  load_both=args.load_both)
    print(render(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["within_bound"] and figures.get("check_within_bound", True) else 1


if __name__ == "__main__":
    sys.exit(main())
