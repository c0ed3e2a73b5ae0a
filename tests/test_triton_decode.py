"""The Triton decode dispatch (CUDA inference, T·k ≤ 512) checked on the CPU via Triton's interpreter,
against the reference loop over experts in float64, for every activation the kernel computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import importlib

import pytest
import torch

dispatch_module = importlib.import_module("upcycle_fx.moe.dispatch")  # the package re-exports the function

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import copy
import torch
from torch import nn
from upcycle_fx.moe.dispatch import dispatch
from upcycle_fx.moe.triton_decode import ASSIGNMENT_KERNEL_MAX_ROWS, _row_block, decode_experts, default_tiles
from upcycle_fx.moe.experts import Experts
from upcycle_fx.moe.routing import top_k_routing
from upcycle_fx.patterns.vocabulary import activation_of_module


class ReLUSquared(nn.Module):
    def forward(self, t):
        return torch.relu(t).square()


class QuickGELU(nn.Module):
    def forward(self, t):
        return t * torch.sigmoid(1.702 * t)


NAMES = {ReLUSquared: "relu2", QuickGELU: "gelu_quick"}
torch.manual_seed(0)
cases = [  # (tokens, E, k, d_model, d_ff, gated, biases, activation, dtype, every token picks expert 0)
    (1, 8, 2, 48, 80, False, True, nn.GELU(approximate="tanh"), torch.float32, False),
    (16, 8, 2, 40, 72, True, False, nn.SiLU(), torch.float32, False),    # unused experts, odd sizes
    (64, 4, 2, 64, 96, False, True, nn.ReLU(), torch.float32, False),    # 128 rows: one full tile
    (64, 64, 8, 32, 48, True, False, nn.SiLU(), torch.float32, False),   # 512 rows: the largest tile
    (5, 16, 4, 32, 48, True, True, nn.SiLU(), torch.float32, False),     # rows not a power of two
    (40, 8, 2, 32, 48, False, True, nn.ReLU(), torch.float32, True),     # 40 rows of one expert: 2 row blocks
    # half precision; bf16 is checked on the GPU (benchmarks/decode_check.py): the interpreter's dot misreads it
    (16, 8, 2, 64, 128, True, False, nn.SiLU(), torch.float16, False),
    (3, 8, 2, 48, 80, True, False, nn.SiLU(), torch.bfloat16, False),    # the per-assignment kernel only
    (4, 2, 2, 48, 80, False, True, nn.GELU(), torch.bfloat16, False),    # every expert chosen by every token
]
# every other activation of the kernel, plain and gated (d_ff not a multiple of the 16-wide slice)
for name, module in [("gelu", nn.GELU()), ("relu2", ReLUSquared()), ("sigmoid", nn.Sigmoid()),
                     ("tanh", nn.Tanh()), ("gelu_quick", QuickGELU())]:
    cases.append((6, 4, 2, 32, 40, False, True, module, torch.float32, False))
    cases.append((6, 4, 2, 32, 40, True, True, module, torch.float32, False))
for tokens, num_experts, k, d_model, d_ff, gated, biases, activation, dtype, skewed in cases:
    name = NAMES.get(type(activation)) or activation_of_module(activation)
    experts = Experts(num_experts, d_model, d_ff, gated=gated, activation=activation, activation_name=name,
                      up_bias=biases, down_bias=biases)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    experts = experts.to(dtype)
    x = torch.randn(tokens, d_model).to(dtype)
    logits = torch.randn(tokens, num_experts)
    if skewed:
        logits[:, 0] += 100.0
    routing = top_k_routing(logits, k, normalize=True)
    rows = routing.expert_idx.numel()
    kernels = {  # both kernels on every case, whichever `dispatch` picks for it
        "per-assignment": default_tiles(d_model, 1, element_size=x.element_size(), gated=gated),
        "per-expert": default_tiles(d_model, ASSIGNMENT_KERNEL_MAX_ROWS + rows, element_size=x.element_size(),
                                    gated=gated, row_block=_row_block(rows, num_experts))}
    assert kernels["per-assignment"].per_assignment and not kernels["per-expert"].per_assignment
    if dtype == torch.bfloat16:
        del kernels["per-expert"]   # the interpreter's tl.dot misreads bf16 (checked on the GPU instead)
    with torch.no_grad():
        outputs = {"dispatch": dispatch(x, routing, experts, "decode")} if dtype != torch.bfloat16 else {}
        for kernel, tiles in kernels.items():
            outputs[kernel] = decode_experts(x, routing.token_idx, routing.expert_idx, routing.weight, experts, tiles)
        want = dispatch(x.double(), routing, copy.deepcopy(experts).double(), "loop")
    for kernel, got in outputs.items():
        assert got.dtype == dtype and got.shape == x.shape
        error = float((got.double() - want).norm() / want.norm())
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        assert error < tolerance, (kernel, tokens, num_experts, k, gated, biases, dtype, error)
        print(f"{kernel}: T={tokens} E={num_experts} k={k} {name} gated={gated} bias={biases} {dtype}: {error:.1e}")
print("triton decode OK")
"""


@pytest.mark.slow
def test_triton_decode_matches_the_loop_oracle():
    """Both decode kernels (per expert, per assignment) vs the float64 loop oracle: ≤ 1e-5 relative
    in float32 and ≤ 2e-2 in float16 and bfloat16 (their inputs are rounded), plain and gated
    experts, with and without biases, unused experts, experts chosen by several assignments,
    1 to 512 assignments, all nine activations the kernels compute."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "triton decode OK" in result.stdout


def test_auto_takes_decode_only_for_cuda_inference_on_few_rows(monkeypatch):
    """The choice `auto` makes: never on the CPU, never with gradients, never past 512 rows or 16 rows
    per chosen expert on average, never for activations the kernel does not compute."""
    from torch import nn

    from upcycle_fx.moe.experts import Experts
    from upcycle_fx.moe.routing import top_k_routing

    experts = Experts(4, 16, 32, gated=False, activation=nn.ReLU(), activation_name="relu")
    routing = top_k_routing(torch.randn(8, 4), 2, normalize=True)
    x = torch.randn(8, 16)
    assert not dispatch_module._decode_applies(x, routing, experts)       # CPU
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(dispatch_module, "_triton_available", lambda: True)
    with torch.no_grad():
        assert dispatch_module._decode_applies(x, routing, experts)
        many = top_k_routing(torch.randn(33, 4), 2, normalize=True)     # 66 assignments: 16.5 per expert
        assert not dispatch_module._decode_applies(torch.randn(33, 16), many, experts)
        wide = Experts(64, 16, 32, gated=False, activation=nn.ReLU(), activation_name="relu")
        assert dispatch_module._decode_applies(torch.randn(64, 16), top_k_routing(torch.randn(64, 64), 8, normalize=True), wide)
        assert not dispatch_module._decode_applies(torch.randn(65, 16), top_k_routing(torch.randn(65, 64), 8, normalize=True), wide)
    assert not dispatch_module._decode_applies(x, routing, experts)       # parameters need gradients
    with torch.no_grad():
        assert not dispatch_module._decode_applies(x.double(), routing, experts.double())   # no float64 kernel
        experts.activation_name = "mish"                                   # not one the kernel computes
        assert not dispatch_module._decode_applies(x, routing, experts)
        experts.activation_name = "gelu"                                   # misnamed: the probe catches it
        assert not dispatch_module._decode_applies(x, routing, experts)


def test_decode_refuses_what_it_cannot_take():
    """Asked for explicitly, the decode path names what it cannot take instead of computing it."""
    from torch import nn

    from upcycle_fx.moe.experts import Experts
    from upcycle_fx.moe.routing import top_k_routing

    experts = Experts(4, 16, 32, gated=False, activation=nn.ReLU(), activation_name="relu")
    routing = top_k_routing(torch.randn(257, 4), 2, normalize=True)
    with pytest.raises(ValueError, match="at most 512 assignments"):
        dispatch_module.dispatch(torch.randn(257, 16), routing, experts, "decode")
    routing = top_k_routing(torch.randn(8, 4), 2, normalize=True)
    experts.activation_name = "silu"     # the module is a ReLU
    with pytest.raises(ValueError, match="does not compute silu"):
        dispatch_module.dispatch(torch.randn(8, 16), routing, experts, "decode")


def test_decode_tiles_fit_the_shared_memory_they_are_given():
    """float32 / gated tiles, and GPUs with ~99 KiB per block, get narrower model-dim chunks."""
    from upcycle_fx.moe.triton_decode import default_tiles

    def up_tile_bytes(tiles, element_size, gated, row_block):
        return tiles.num_stages * element_size * tiles.block_d * (row_block + (2 if gated else 1) * tiles.block_f)

    h100 = default_tiles(4096, 32, gated=True)
    assert (h100.block_f, h100.block_d, h100.per_assignment) == (64, 128, False)
    for element_size, gated, row_block, limit in [(2, True, 16, 101376), (4, True, 16, None), (4, False, 64, 101376)]:
        tiles = default_tiles(4096, 128, element_size=element_size, gated=gated, row_block=row_block,
                              shared_limit=limit)
        budget = 128 * 1024 if limit is None else min(128 * 1024, int(0.75 * limit))
        assert up_tile_bytes(tiles, element_size, gated, row_block) <= budget
        assert tiles.block_d < h100.block_d


def test_decode_kernel_choice_by_assignment_count():
    """Up to ASSIGNMENT_KERNEL_MAX_ROWS assignments the per-assignment kernel (no shared-memory
    tiles, narrower chunks in float32), beyond it the per-expert kernel."""
    from upcycle_fx.moe.triton_decode import ASSIGNMENT_KERNEL_MAX_ROWS, default_tiles

    few = default_tiles(768, ASSIGNMENT_KERNEL_MAX_ROWS)
    assert few.per_assignment and (few.block_f, few.block_d) == (64, 256)
    assert default_tiles(768, 2, element_size=4).block_d == 128
    assert default_tiles(4096, 2, gated=True).block_f == 128
    assert not default_tiles(768, ASSIGNMENT_KERNEL_MAX_ROWS + 1).per_assignment
