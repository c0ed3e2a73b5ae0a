"""CUDA check of the Triton decode dispatch in float32, float16 and bfloat16 against the float64 loop oracle.

    PYTHONPATH=. python benchmarks/decode_check.py        # exit status 1 if any case fails

Shapes of benchmarks/moe_bench.py (small d=768 with biases, fine-grained E=64 k=8, Mixtral), at
token counts the decode path takes (T·k ≤ 512, at most 16 per chosen expert on average);
`dispatch(..., "auto")` under no_grad picks it.
Tolerances (relative, Frobenius): 1e-5 in float32, 5e-3 in float16, 2e-2 in bfloat16.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from upcycle_fx.moe.dispatch import _decode_applies, dispatch
from upcycle_fx.moe.experts import Experts
from upcycle_fx.moe.routing import top_k_routing

TOLERANCES = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CASES = [  # (tokens, E, k, d_model, d_ff, gated and bias-free; else GELU with biases)
    (1, 8, 2, 768, 3072, False), (64, 32, 2, 768, 3072, False), (16, 64, 8, 2048, 1024, True),
    (64, 64, 8, 2048, 1024, True), (7, 8, 2, 4096, 14336, True)]


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
            with torch.no_grad():
                takes_decode = _decode_applies(x, routing, experts)
                got = dispatch(x, routing, experts, "auto")
                want = dispatch(x.double(), routing, experts.double(), "loop")
            error = float((got.double() - want).norm() / want.norm())
            failures += error >= tolerance or not takes_decode
            if not takes_decode:
                print("  FAIL: auto did not take the decode kernel")
            print(f"{str(dtype):15s} T={tokens} E={num_experts} k={k} D={d_model} F={d_ff}: relative error "
                  f"{error:.1e} {'ok' if error < tolerance else 'FAIL'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
