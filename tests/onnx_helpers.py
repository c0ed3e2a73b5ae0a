"""Helpers shared by the ONNX tests: stand-alone MoE layers and onnxruntime runs."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from upcycle_fx.moe import Experts, MoE, MoESettings, Router

ONNX_TOLERANCE = 1e-4  # issue 3: relative error of onnxruntime (CPU, float32) against PyTorch

ACTIVATIONS = {
    "relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_quick": lambda: QuickGELU(), "relu2": lambda: SquaredReLU(), "sigmoid": nn.Sigmoid,
}


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x).square()


def make_moe(*, activation: str = "silu", gated: bool = False, bias: bool = True, num_experts: int = 4,
             d_model: int = 16, d_ff: int = 24, seed: int = 0, dtype=torch.float32,
             activation_module: nn.Module | None = None, **settings) -> MoE:
    """An MoE with distinct random experts and a random router (no ties: routing matters)."""
    generator = torch.Generator().manual_seed(seed)
    router = Router(d_model, num_experts, init_std=1.0, generator=generator)
    experts = Experts(num_experts, d_model, d_ff, gated=gated,
                      activation=activation_module or ACTIVATIONS[activation](),
                      activation_name=activation, up_bias=bias, down_bias=bias)
    with torch.no_grad():
        for param in experts.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return MoE(router, experts, MoESettings(**settings)).to(dtype).eval()


class Block(nn.Module):
    """x + moe(x): a residual block around one MoE layer, input [batch, seq, d_model]."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return x + self.moe(x)


def tokens(batch: int, seq: int, d_model: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, d_model, generator=torch.Generator().manual_seed(seed + 97 * batch + seq))


def ort_session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(session, feeds: dict[str, torch.Tensor]) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]


def relative_error(actual: np.ndarray, expected: torch.Tensor) -> float:
    expected = expected.detach().double().numpy()
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


# ----------------------------------------------------------------------------- zoo parity worker

ZOO_EXPORT_SIZE = (2, 8)
ZOO_CHECK_SIZES = [(3, 5), (1, 11)]


def upcycled_zoo_model(name: str) -> nn.Module:
    """A zoo model upcycled with distinct experts (noise) and a random router (no ties)."""
    import upcycle_fx
    from upcycle_fx.testing.zoo import ZOO

    zoo_model = ZOO[name]
    if zoo_model.requires:
        __import__(zoo_model.requires)   # every zoo dependency is installed in CI: no skipping
    model = upcycle_fx.rewrite(zoo_model.build(), num_experts=4, top_k=2, router_init_std=1.0,
                               expert_noise_std=0.05, seed=0)
    for _, moe in upcycle_fx.moe_layers(model):
        assert not torch.equal(moe.experts.up_proj[0], moe.experts.up_proj[1]), "experts must differ"
    return model


def zoo_max_error(name: str, model: nn.Module, path) -> float:
    """Largest relative error of onnxruntime against PyTorch over ZOO_CHECK_SIZES."""
    from upcycle_fx.report import first_tensor
    from upcycle_fx.testing.zoo import ZOO

    session = ort_session(path)
    errors = []
    for batch, seq in ZOO_CHECK_SIZES:
        inputs = ZOO[name].inputs(batch, seq)
        with torch.no_grad():
            expected = first_tensor(model(**inputs))
        errors.append(relative_error(ort_run(session, inputs), expected))
    return max(errors)


def zoo_export_parity(name: str, directory: str) -> dict:
    """Upcycle zoo model `name`, export it with its second, fourth, ... MoE layers forced portable,
    and measure onnxruntime against PyTorch. Returns plain data (runs in a worker process):
    {"layers": {name: (lowering, mlp_index)}, "error": float} or {"export_error": message}."""
    import pathlib

    from upcycle_fx import moe_layers
    from upcycle_fx.exporters import OnnxExportError, export_onnx
    from upcycle_fx.testing.zoo import ZOO

    torch.set_num_threads(1)
    model = upcycled_zoo_model(name)
    layers = moe_layers(model)
    forced = [layer for layer, _ in layers[1::2]]
    try:
        path = export_onnx(model, pathlib.Path(directory) / f"{name}.onnx",
                           kwargs=ZOO[name].inputs(*ZOO_EXPORT_SIZE), portable_layers=forced,
                           optimize=False)
    except OnnxExportError as error:
        return {"export_error": str(error)}
    index = {layer: moe.mlp_index for layer, moe in layers}
    return {"layers": {layer.name: (layer.lowering, index[layer.name]) for layer in path.report.layers},
            "forced": forced, "error": zoo_max_error(name, model, path)}
