"""CUDA check of the Triton decode dispatch in float32, float16 and bfloat16 against the float64 loop oracle.

    PYTHONPATH=. python benchmarks/decode_check.py        # exit status 1 if any case fails

Shapes of benchmarks/moe_bench.py (small d=768 with biases, fine-grained E=64 k=8, Mixtral), at
token counts the decode path takes (T·k ≤ 512, at most 16 per chosen expert on average; both
kernels: per assignment up to 16 assignments, per expert beyond); `dispatch(..., "auto")` under
no_grad picks it. Every case runs with and without programmatic dependent launch, eagerly and
as CUDA-graph replays on fresh inputs (each replay checked against the oracle: an ordering
bug between the zeroing, compute and cast kernels shows up there).
Tolerances (relative, Frobenius): 1e-5 in float32, 5e-3 in float16, 2e-2 in bfloat16.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from upcycle_fx.moe import triton_decode
from upcycle_fx.moe.dispatch import _decode_applies, dispatch
from upcycle_fx.moe.experts import Experts
from upcycle_fx.moe.routing import top_k_routing

TOLERANCES = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CASES = [  # (tokens, E, k, d_model, d_ff, gated and bias-free; else GELU with biases)
    (1, 8, 2, 768, 3072, False), (8, 8, 2, 768, 3072, False), (64, 32, 2, 768, 3072, False),
    (2, 64, 8, 2048, 1024, True), (16, 64, 8, 2048, 1024, True), (64, 64, 8, 2048, 1024, True),
    (7, 8, 2, 4096, 14336, True), (16, 8, 2, 4096, 14336, True)]
REPLAYS = 20


def relative_error(got, want) -> float:
    return float((got.double() - want).norm() / want.norm())


def graph_error(x, routing, experts, oracle) -> float:
    """Worst error of CUDA-graph replays of the dispatch on fresh inputs, each against the oracle."""
    static = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            dispatch(static, routing, experts, "auto")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = dispatch(static, routing, experts, "auto")
    worst = 0.0
    for _ in range(REPLAYS):
        static.copy_(torch.randn_like(static))
        graph.replay()
        worst = max(worst, relative_error(out, oracle(static)))
    return worst


def main() -> int:
    torch.manual_seed(0)
    failures = 0
    for dtype, tolerance in TOLERANCES.items():
        for tokens, num_experts, k, d_model, d_ff, gated in CASES:
            experts = Experts(num_experts, d_model, d_ff, gated=gated,
                              activation=nn.SiLU() if gated else nn.GELU(approximate="tanh"),
                              activation_name="silu" if gated else "gelu_tanh", up_bias=not gated, down_bias=not gated)
            with torch.no_grad():
                for p in experts.parameters():
                    p.copy_(torch.randn_like(p) * d_model ** -0.5)
            experts = experts.cuda().to(dtype)
            x = torch.randn(tokens, d_model, device="cuda").to(dtype)
            routing = top_k_routing(torch.randn(tokens, num_experts, device="cuda"), k, normalize=True)
            reference = copy.deepcopy(experts).double()

            def oracle(inputs):
                with torch.no_grad():
                    return dispatch(inputs.double(), routing, reference, "loop")
            for pdl in (True, False):
                triton_decode.PROGRAMMATIC_LAUNCH = pdl
                with torch.no_grad():
                    takes_decode = _decode_applies(x, routing, experts)
                    error = relative_error(dispatch(x, routing, experts, "auto"), oracle(x))
                replayed = graph_error(x, routing, experts, oracle)
                ok = takes_decode and error < tolerance and replayed < tolerance
                failures += not ok
                if not takes_decode:
                    print("  FAIL: auto did not take the decode kernel")
                print(f"{str(dtype):15s} T={tokens} E={num_experts} k={k} D={d_model} F={d_ff} "
                      f"{'per-assignment' if tokens * k <= triton_decode.ASSIGNMENT_KERNEL_MAX_ROWS else 'per-expert'} "
                      f"pdl={pdl}: relative error {error:.1e}, {REPLAYS} graph replays {replayed:.1e} "
                      f"{'ok' if ok else 'FAIL'}")
    triton_decode.PROGRAMMATIC_LAUNCH = True
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
