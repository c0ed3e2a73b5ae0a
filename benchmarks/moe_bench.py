"""MoE expert-layer benchmark: upcycle_fx's dispatch against the field, in one run.

    python benchmarks/moe_bench.py --out results.json            # CUDA, bf16, all shapes
    python benchmarks/moe_bench.py --smoke                        # CPU, tiny shapes (CI)

Every implementation gets the same routing (top-k indices and weights from one random router)
and computes `out[t] = Σ_k w_tk · expert_{e_tk}(x_t)`. Baselines measured in the same run:
* hf_eager / hf_batched_mm / hf_grouped_mm: the experts implementations of the installed
  Hugging Face transformers (`transformers.integrations.moe`; eager is the per-expert loop of
  its MoE models), called on an adapter exposing our weights under HF's names;
* all_masked: every expert on every token (batched matmul), then the routing weights as a mask;
* dense_bound: one cuBLAS MLP of the expert's shape over the same T·k rows (no routing):
  the practical upper bound.
Before timing, each implementation is checked against the float32 loop oracle. On CUDA our
forward+backward also runs under `torch.cuda.set_sync_debug_mode("error")`: any host sync fails.
For T <= 64 two decode floors are reported: reading the chosen experts' weights once at the
measured copy bandwidth, and the measured time of the fastest plain read of those bytes
(`read_floor.py`: at a few tens of MB no kernel reaches the copy bandwidth), with our dispatch (which takes the Triton decode kernel for inference on
few assignments, `dispatch.py`) and our grouped path both timed as CUDA-graph replays of the
dispatch alone, given the routing (the throughput columns include building our `Routing` from
HF-style (index, weights) each call); the decode path is checked against the oracle first too.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.read_floor import measured_read_floor  # noqa: E402
from upcycle_fx.moe.dispatch import dispatch  # noqa: E402
from upcycle_fx.moe.experts import Experts, FFNWeights  # noqa: E402
from upcycle_fx.moe.routing import Routing  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    d_model: int
    d_ff: int
    num_experts: int
    top_k: int
    gated: bool
    bias: bool
    activation: str

    def flops(self, tokens: int) -> float:
        """Forward FLOPs of the experts: 2·g·T·k·d·f (g = 3 gated, 2 plain)."""
        return 2 * (3 if self.gated else 2) * tokens * self.top_k * self.d_model * self.d_ff

    def expert_bytes(self, element_size: int) -> int:
        rows = (3 if self.gated else 2) * self.d_ff
        return rows * self.d_model * element_size


SHAPES = [
    Shape("mixtral", 4096, 14336, 8, 2, True, False, "silu"),
    Shape("small-e8", 768, 3072, 8, 2, False, True, "gelu"),
    Shape("small-e32", 768, 3072, 32, 2, False, True, "gelu"),
    Shape("fine-e64", 2048, 1024, 64, 8, True, False, "silu"),
]
TOKENS = [1, 16, 64, 512, 4096, 16384, 32768]
SMOKE_SHAPES = [Shape("smoke-gated", 32, 48, 4, 2, True, False, "silu"),
                Shape("smoke-plain", 24, 40, 6, 2, False, True, "gelu")]
SMOKE_TOKENS = [1, 16, 64]

ACTIVATIONS = {"silu": torch.nn.SiLU, "gelu": torch.nn.GELU}


# --- inputs ---------------------------------------------------------------------------------
def make_experts(shape: Shape, device, dtype, seed=0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * shape.d_ff if shape.gated else shape.d_ff
    up = torch.randn(rows, shape.d_model, generator=g) / math.sqrt(shape.d_model)
    down = torch.randn(shape.d_model, shape.d_ff, generator=g) / math.sqrt(shape.d_ff)
    biases = (torch.randn(rows, generator=g) * 0.1, torch.randn(shape.d_model, generator=g) * 0.1)
    weights = FFNWeights(up, biases[0] if shape.bias else None, down, biases[1] if shape.bias else None,
                         shape.gated)
    experts = Experts.tile(weights, shape.num_experts, activation=ACTIVATIONS[shape.activation](),
                           activation_name=shape.activation, noise_std=0.02 / math.sqrt(shape.d_model),
                           generator=g)
    return experts.to(device=device, dtype=dtype)


def make_routing(shape: Shape, tokens: int, device, seed=1):
    """Top-k of a random softmax router: (index [T, k], weights [T, k] float32)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, shape.num_experts, generator=g).to(device)
    weights, index = torch.topk(torch.softmax(logits, -1), shape.top_k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def as_routing(index: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Routing:
    tokens, k = index.shape
    token_idx = torch.arange(tokens, device=index.device).repeat_interleave(k)
    flat = index.reshape(-1)
    return Routing(token_idx, flat, weights.reshape(-1), torch.ones_like(flat, dtype=torch.bool),
                   torch.empty(0, num_experts, device=index.device), num_experts)


# --- implementations -----------------------------------------------------------------------
def ours(experts: Experts, impl: str = "auto"):
    """Our dispatch core; `auto` takes the Triton decode path for small inference batches on CUDA."""
    def run(x, index, weights):
        return dispatch(x, as_routing(index, weights, experts.num_experts), experts, impl)
    return run


def loop_oracle(experts: Experts):
    def run(x, index, weights):
        return dispatch(x, as_routing(index, weights, experts.num_experts), experts, "loop")
    return run


class HFAdapter(torch.nn.Module):
    """Our stacked weights under the attribute names HF's experts functions read."""

    def __init__(self, experts: Experts):
        super().__init__()
        self.num_experts = experts.num_experts
        self.has_gate, self.has_bias = experts.gated, experts.up_bias is not None
        self.is_transposed, self.is_concatenated = False, True
        self.has_post_expert_norm, self._is_expert_parallel = False, False
        self.act_fn = experts.activation
        up_name = "gate_up_proj" if experts.gated else "up_proj"
        setattr(self, up_name, experts.up_proj)
        self.down_proj = experts.down_proj
        if self.has_bias:
            setattr(self, f"{up_name}_bias", experts.up_bias)
            self.down_proj_bias = experts.down_bias
        self.experts = experts

    def _apply_gate(self, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def hf_eager(experts: Experts):
    """transformers' eager experts loop (MixtralExperts.forward), generalised to plain FFNs."""
    def run(x, index, weights):
        out = torch.zeros_like(x)
        with torch.no_grad():
            mask = F.one_hot(index, num_classes=experts.num_experts).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(mask[expert_idx])
            current = x[token_idx]
            y = experts.forward_expert(int(expert_idx), current)
            y = y * weights[token_idx, top_k_pos, None].to(y.dtype)
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out
    return run


def hf_function(name: str):
    from transformers.integrations import moe as hf_moe

    function = {"batched_mm": hf_moe.batched_mm_experts_forward,
                "grouped_mm": hf_moe.grouped_mm_experts_forward}[name]

    def factory(experts: Experts):
        adapter = HFAdapter(experts)

        def run(x, index, weights):
            return function(adapter, x, index, weights.to(x.dtype))
        return run
    return factory


def all_masked(experts: Experts):
    def run(x, index, weights):
        xe = x.unsqueeze(0).expand(experts.num_experts, -1, -1)
        y = experts.forward_batched(xe)  # [E, T, D]
        dense_w = torch.zeros(x.shape[0], experts.num_experts, device=x.device, dtype=torch.float32)
        dense_w.scatter_(1, index, weights)
        return torch.einsum("etd,te->td", y.float(), dense_w).to(x.dtype)
    return run


def dense_bound(experts: Experts, k: int):
    """One expert-shaped MLP over T·k rows: the cuBLAS bound for the same FLOPs."""
    def run(x, index, weights):
        rows = x.repeat_interleave(k, dim=0)
        return experts.forward_expert(0, rows)
    return run


IMPLEMENTATIONS: dict[str, Callable] = {
    "upcycle_fx": ours,
    "hf_eager": hf_eager,
    "hf_batched_mm": hf_function("batched_mm"),
    "hf_grouped_mm": hf_function("grouped_mm"),
    "all_masked": all_masked,
}


# --- timing -----------------------------------------------------------------------------------
def time_ms(fn, device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device) -> float:
    """Measured device-memory bandwidth, bytes/s (read + write of a large copy)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms / 1e3)


def graph_replay_ms(fn, device) -> float | None:
    """Time a CUDA-graph replay of `fn` (launch gaps removed); None where capture fails."""
    if device.type != "cuda":
        return None
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return time_ms(graph.replay, device)
    except Exception as error:  # noqa: BLE001
        print(f"  graph capture failed: {type(error).__name__}: {error}")
        return None


def fits(shape: Shape, tokens: int, impl: str, backward: bool, element_size: int) -> bool:
    """Skip runs whose intermediates would not fit comfortably (all_masked holds [E, T, f])."""
    rows = tokens * (shape.num_experts if impl == "all_masked" else shape.top_k)
    width = (2 if shape.gated else 1) * shape.d_ff + shape.d_model
    need = rows * width * element_size * (3 if backward else 1)
    if impl == "hf_batched_mm":
        need += tokens * shape.top_k * shape.expert_bytes(element_size) * (2 if backward else 1)
    return need < 24e9


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# --- main -------------------------------------------------------------------------------------
def check(shape: Shape, device, dtype) -> dict[str, float]:
    """Each implementation vs the float32 loop oracle on fresh data (T=64)."""
    experts = make_experts(shape, device, dtype)
    reference = make_experts(shape, device, torch.float32)
    x = torch.randn(64, shape.d_model, device=device)
    index, weights = make_routing(shape, 64, device, seed=7)
    expected = loop_oracle(reference)(x, index, weights)
    errors = {}
    for name, factory in IMPLEMENTATIONS.items():
        try:
            errors[name] = relative(factory(experts)(x.to(dtype), index, weights), expected)
        except Exception as error:  # noqa: BLE001
            errors[name] = float("nan")
            print(f"  {name}: check failed: {type(error).__name__}: {error}")
    if device.type == "cuda":  # the decode path (inference, few assignments) against the same oracle
        small_x = x[:16]
        small_index, small_weights = index[:16], weights[:16]
        with torch.no_grad():
            errors["upcycle_fx_decode"] = relative(ours(experts, "decode")(small_x.to(dtype), small_index, small_weights),
                                                   loop_oracle(reference)(small_x, small_index, small_weights))
    if device.type == "cuda":  # no host sync in our forward + backward
        xs = x.to(dtype).requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours(experts)(xs, index, weights).float().square().sum().backward()
            errors["upcycle_fx_no_sync"] = 1.0
        except RuntimeError as error:
            print(f"  host sync in our path: {error}")
            errors["upcycle_fx_no_sync"] = 0.0
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return errors


def bench(shapes, tokens_list, device, dtype, backward_modes) -> list[dict]:
    rows = []
    bandwidth = copy_bandwidth(device)
    element_size = torch.empty(0, dtype=dtype).element_size()
    for shape in shapes:
        errors = check(shape, device, dtype)
        print(f"{shape.name}: errors vs fp32 oracle " + ", ".join(f"{k}={v:.1e}" for k, v in errors.items()))
        experts = make_experts(shape, device, dtype)
        impls = {name: factory(experts) for name, factory in IMPLEMENTATIONS.items()}
        impls["dense_bound"] = dense_bound(experts, shape.top_k)
        for tokens in tokens_list:
            index, weights = make_routing(shape, tokens, device)
            x = torch.randn(tokens, shape.d_model, device=device, dtype=dtype)
            for backward in backward_modes:
                record = {"shape": shape.name, "tokens": tokens, "mode": "fwd+bwd" if backward else "fwd",
                          "flops": shape.flops(tokens) * (3 if backward else 1)}
                for name, run in impls.items():
                    if not fits(shape, tokens, name, backward, element_size):
                        continue
                    record[name] = measure(run, x, index, weights, experts, backward, device)
                if not backward and tokens <= 64 and device.type == "cuda":
                    used = int(torch.unique(index).numel())
                    record["floor_ms"] = used * shape.expert_bytes(element_size) / bandwidth * 1e3
                    record["read_floor_ms"], record["read_floor_kernel"] = measured_read_floor(
                        used * shape.expert_bytes(element_size), device, lambda fn: graph_replay_ms(fn, device), dtype)
                    record["experts_read"] = used
                    # the dispatch alone, given the routing (built once, as the router hands it over)
                    routing = as_routing(index, weights, shape.num_experts)
                    with torch.no_grad():
                        record["upcycle_fx_graph"] = graph_replay_ms(lambda: dispatch(x, routing, experts), device)
                        record["grouped_graph"] = graph_replay_ms(lambda: dispatch(x, routing, experts, "grouped"), device)
                rows.append(record)
                print(format_row(record))
    return rows


def measure(run, x, index, weights, experts, backward, device) -> float | None:
    try:
        if not backward:
            with torch.no_grad():
                return time_ms(lambda: run(x, index, weights), device)
        xs = x.detach().requires_grad_()
        grads: dict[tuple, torch.Tensor] = {}

        def step():
            experts.zero_grad(set_to_none=True)  # as in training: gradients written, not accumulated
            xs.grad = None
            out = run(xs, index, weights)
            if out.shape not in grads:  # dense_bound returns T·k rows
                grads[out.shape] = torch.randn_like(out)
            out.backward(grads[out.shape])
        return time_ms(step, device)
    except Exception as error:  # noqa: BLE001
        print(f"    failed: {type(error).__name__}: {str(error)[:120]}")
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def format_row(record: dict) -> str:
    ours_ms = record.get("upcycle_fx")
    parts = [f"{record['shape']:>10} T={record['tokens']:>6} {record['mode']:>7}"]
    for name in ("upcycle_fx", "hf_eager", "hf_batched_mm", "hf_grouped_mm", "all_masked", "dense_bound"):
        ms = record.get(name)
        parts.append(f"{name}={ms:.3f}" if ms else f"{name}=-")
    if ours_ms:
        tflops = record["flops"] / (ours_ms / 1e3) / 1e12
        parts.append(f"ours {tflops:.0f} TF/s")
        if record.get("dense_bound"):
            parts.append(f"{100 * record['dense_bound'] / ours_ms:.0f}% of dense")
        if record.get("hf_eager"):
            parts.append(f"{record['hf_eager'] / ours_ms:.1f}x eager")
        if record.get("floor_ms"):
            graph = record.get("upcycle_fx_graph")
            parts.append(f"floor {record['floor_ms']:.3f} (graph {graph:.3f}: {graph / record['floor_ms']:.2f}x)"
                         if graph else f"floor {record['floor_ms']:.3f}")
            if graph and record.get("read_floor_ms"):
                parts.append(f"read floor {record['read_floor_ms']:.4f} ({graph / record['read_floor_ms']:.2f}x, "
                             f"{record['read_floor_kernel']})")
    return " ".join(parts)


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table (ms; our TF/s, share of the dense bound, speed-up)."""
    names = ("upcycle_fx", "hf_eager", "hf_batched_mm", "hf_grouped_mm", "all_masked", "dense_bound")
    lines = ["| shape | T | mode | " + " | ".join(names) + " | ours TF/s | % of dense bound | x eager | decode floor (graph) |",
             "|---|---:|---|" + "---:|" * (len(names) + 4)]
    for r in rows:
        cells = [f"{r[n]:.3f}" if r.get(n) else "-" for n in names]
        ours_ms = r.get("upcycle_fx")
        tflops = f"{r['flops'] / (ours_ms / 1e3) / 1e12:.0f}" if ours_ms else "-"
        share = f"{100 * r['dense_bound'] / ours_ms:.0f}%" if ours_ms and r.get("dense_bound") else "-"
        speedup = f"{r['hf_eager'] / ours_ms:.1f}" if ours_ms and r.get("hf_eager") else "-"
        floor = "-"
        if r.get("floor_ms") and r.get("upcycle_fx_graph"):
            floor = f"{r['floor_ms']:.3f} ({r['upcycle_fx_graph']:.3f}: {r['upcycle_fx_graph'] / r['floor_ms']:.2f}x)"
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | " + " | ".join(cells)
                     + f" | {tflops} | {share} | {speedup} | {floor} |")
    return "\n".join(lines)


def decode_markdown(rows: list[dict]) -> str:
    """Small batches against the weight-read floors: our layer (auto: the decode kernel where it
    applies) and the grouped path, both replayed as CUDA graphs; the bandwidth floor is bytes over
    the copy bandwidth, the measured one the fastest plain read of those bytes (`read_floor.py`)."""
    lines = ["| shape | T | experts read | bandwidth floor (ms) | measured read floor (ms) | ours, graph (ms) "
             "| ours / bandwidth floor | ours / read floor | grouped path, graph (ms) | grouped / read floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r.get("floor_ms") or not r.get("upcycle_fx_graph"):
            continue
        ours, grouped, read = r["upcycle_fx_graph"], r.get("grouped_graph"), r.get("read_floor_ms")
        lines.append(f"| {r['shape']} | {r['tokens']} | {r.get('experts_read', '-')} | {r['floor_ms']:.4f} | "
                     + (f"{read:.4f}" if read else "-") + f" | {ours:.4f} | {ours / r['floor_ms']:.2f}x | "
                     + (f"{ours / read:.2f}x" if read else "-") + " | "
                     + (f"{grouped:.4f} | " if grouped else "- | ")
                     + (f"{grouped / read:.2f}x |" if grouped and read else "- |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (CI)")
    parser.add_argument("--shapes", nargs="*", help="subset of shape names")
    parser.add_argument("--tokens", nargs="*", type=int, help="subset of T values")
    parser.add_argument("--fwd-only", action="store_true")
    parser.add_argument("--out", type=Path, help="write the JSON results here")
    parser.add_argument("--render", type=Path, help="print a results JSON as a Markdown table and exit")
    args = parser.parse_args(argv)
    if args.render:
        rows = json.loads(args.render.read_text())["rows"]
        print(markdown(rows) + "\n\n" + decode_markdown(rows))
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes]
    tokens = args.tokens or (SMOKE_TOKENS if args.smoke else TOKENS)
    modes = (False,) if args.fwd_only else (False, True)
    import transformers

    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(dtype), "shapes": [asdict(s) for s in shapes]}
    print(json.dumps(meta))
    rows = bench(shapes, tokens, device, dtype, modes)
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(markdown(rows))
    print()
    print(decode_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
