"""The Triton forms of the built-in activations: z -> act(z) on float32 values, inlined into the
decode kernel (tanh is written through the sigmoid, which Triton has)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def relu(z):
    return tl.maximum(z, 0.0)


@triton.jit
def square(z):
    return z * z


@triton.jit
def relu2(z):
    r = tl.maximum(z, 0.0)
    return r * r


@triton.jit
def silu(z):
    return z * tl.sigmoid(z)


@triton.jit
def sigmoid(z):
    return tl.sigmoid(z)


@triton.jit
def tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def gelu(z):
    return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))


@triton.jit
def gelu_tanh(z):
    """0.5 z (1 + tanh(u)) = z · sigmoid(2u), u = sqrt(2/π) (z + 0.044715 z³)."""
    return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))


@triton.jit
def gelu_quick(z):
    return z * tl.sigmoid(1.702 * z)
