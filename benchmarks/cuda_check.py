"""Correctness of the MoE layer on CUDA, before anything is timed.

    python benchmarks/cuda_check.py

Checks, each against the float32 loop oracle on fresh random data:
* bf16 MoE layer (router + routing + dispatch) for dropless top-k, capped top-k and expert
  choice, plain and gated experts: forward values and input/weight gradients;
* no host synchronisation in the bf16 forward + backward (`set_sync_debug_mode("error")`);
* `torch.compile(fullgraph=True)` (inductor) and CUDA-graph capture of the bf16 layer;
* float16 / float32 layers (Triton grouped matmul, also without host sync);
* an upcycled Hugging Face Llama on the GPU: forward equals dense, generate() runs.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import upcycle_fx  # noqa: E402
from upcycle_fx.moe import MoE, MoESettings, Router  # noqa: E402
from upcycle_fx.moe.experts import Experts, FFNWeights  # noqa: E402

RESULTS: list[tuple[str, bool, str]] = []
SETTINGS = {"dropless": MoESettings(), "capacity": MoESettings(capacity_factor=1.0),
            "expert_choice": MoESettings(routing="expert_choice")}


def record(name: str):
    def wrap(fn):
        try:
            detail = fn() or ""
            RESULTS.append((name, True, detail))
        except Exception as error:  # noqa: BLE001
            RESULTS.append((name, False, f"{type(error).__name__}: {error}"))
            traceback.print_exc()
        return fn
    return wrap


def layer(settings: MoESettings, gated: bool, d=256, f=512, num_experts=8, seed=0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * f if gated else f
    weights = FFNWeights(torch.randn(rows, d, generator=g) / d ** 0.5, torch.randn(rows, generator=g) * 0.1,
                         torch.randn(d, f, generator=g) / f ** 0.5, torch.randn(d, generator=g) * 0.1, gated)
    experts = Experts.tile(weights, num_experts, activation=torch.nn.SiLU(), noise_std=0.05, generator=g)
    return MoE(Router(d, num_experts, init_std=1.0, generator=g), experts, settings)


def relative(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def compare_to_oracle(moe: MoE, dtype, tolerance: float) -> str:
    """The fast layer in `dtype` vs the loop oracle in float32 on the same (rounded) weights and
    inputs, so that both make the same routing decisions and only the expert arithmetic differs."""
    fast = moe.to(dtype)
    oracle = layer(moe.settings, moe.experts.gated).cuda()
    oracle.load_state_dict({k: v.float() for k, v in fast.state_dict().items()})
    oracle.dispatch_impl = "loop"
    x = torch.randn(4, 64, moe.experts.d_model, device="cuda").to(dtype)
    xf, xo = x.detach().clone().requires_grad_(), x.detach().float().requires_grad_()
    out_fast, out_oracle = fast(xf), oracle(xo)
    grad = torch.randn_like(out_oracle)
    out_fast.backward(grad.to(dtype))
    out_oracle.backward(grad)
    errors = {"out": relative(out_fast, out_oracle), "dx": relative(xf.grad, xo.grad),
              "d_up": relative(fast.experts.up_proj.grad, oracle.experts.up_proj.grad),
              "d_router": relative(fast.router.weight.grad, oracle.router.weight.grad)}
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    if bad:
        raise AssertionError(f"errors above {tolerance}: {bad}")
    return " ".join(f"{k}={v:.1e}" for k, v in errors.items())


for routing_name, settings in SETTINGS.items():
    for gated in (True, False):
        record(f"bf16 {routing_name} {'gated' if gated else 'plain'} vs fp32 oracle")(
            lambda s=settings, g=gated: compare_to_oracle(layer(s, g).cuda(), torch.bfloat16, 3e-2))


NO_SYNC_CASES = [(name, settings, torch.bfloat16) for name, settings in SETTINGS.items()]
NO_SYNC_CASES += [("dropless", MoESettings(), torch.float16), ("dropless", MoESettings(), torch.float32)]
for routing_name, settings, dtype in NO_SYNC_CASES:
    @record(f"{dtype} {routing_name}: no host sync in forward+backward")
    def _(settings=settings, dtype=dtype):
        moe = layer(settings, True).cuda().to(dtype)
        x = torch.randn(512, 256, device="cuda", dtype=dtype, requires_grad=True)
        moe(x)  # warm-up: allocator, kernels
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            (moe(x).float().square().mean() + moe.last_aux_loss).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


for dtype, tolerance in ((torch.float16, 5e-3), (torch.float32, 1e-4)):
    record(f"{dtype} dropless gated vs fp32 oracle (Triton grouped matmul)")(
        lambda dtype=dtype, tolerance=tolerance: compare_to_oracle(layer(MoESettings(), True).cuda(), dtype, tolerance))


@record("timing, d=2048 f=5632 E=8 k=2 T=4096 fwd+bwd: fp16/fp32 Triton vs bf16 grouped_mm")
def _():
    from triton.testing import do_bench

    times = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        moe = layer(MoESettings(), True, d=2048, f=5632).cuda().to(dtype)
        x = torch.randn(4096, 2048, device="cuda", dtype=dtype, requires_grad=True)

        def step():
            moe.zero_grad(set_to_none=True)
            moe(x).float().sum().backward()
        times[str(dtype).split(".")[-1]] = do_bench(step, warmup=10, rep=50, return_mode="median")
    return " ".join(f"{k}={v:.2f}ms" for k, v in times.items())


@record("torch.compile(fullgraph=True) bf16 dropless, inductor")
def _():
    torch._dynamo.reset()
    moe = layer(MoESettings(), True).cuda().to(torch.bfloat16)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True)
    out = compiled(x)
    out.float().sum().backward()
    return f"rel vs eager {relative(out, moe(x)):.1e}"


@record("CUDA-graph capture of the bf16 dropless layer (T=16)")
def _():
    moe = layer(MoESettings(), True).cuda().to(torch.bfloat16)
    static = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            moe(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = moe(static)
    fresh = torch.randn_like(static)
    static.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        expected = moe(fresh)
    error = relative(out, expected)
    assert error < 1e-2, error
    return f"replay vs eager {error:.1e}"


@record("upcycled HF Llama on CUDA: forward == dense (fp32), generate() in bf16")
def _():
    import transformers

    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(config).eval()
    sparse = upcycle_fx.rewrite(dense, router_init_std=1.0, seed=0)
    dense, sparse = dense.cuda(), sparse.cuda()
    ids = torch.randint(0, 512, (2, 16), device="cuda")
    with torch.no_grad():
        error = relative(sparse(ids).logits, dense(ids).logits)
    assert error < 1e-5, error
    tokens = sparse.to(torch.bfloat16).generate(ids, max_new_tokens=8, do_sample=False)
    return f"rel {error:.1e}, generated {tuple(tokens.shape)}"


width = max(len(name) for name, _, _ in RESULTS)
for name, ok, detail in RESULTS:
    print(f"{'PASS' if ok else 'FAIL'}  {name:<{width}}  {detail}")
sys.exit(0 if all(ok for _, ok, _ in RESULTS) else 1)
