"""ONNX export of single MoE layers: the per-layer decision, both lowerings, the file format.

Every parity check runs onnxruntime (CPU EP, float32) against the PyTorch MoE layer, with
distinct random experts and a random router so that a wrong routing cannot hide.
"""

from __future__ import annotations

import io
import logging

import onnx
import pytest
import torch
from torch import nn

import upcycle_fx
from upcycle_fx.exporters import OnnxExportError, export_onnx
from upcycle_fx.exporters.onnx import export as export_module
from upcycle_fx.exporters.onnx.fused import fused_forward, interleave_gate_up, packed_fc1
from upcycle_fx.exporters.onnx.plan import fused_form
from upcycle_fx.exporters.onnx.portable import portable_forward
from upcycle_fx.exporters.onnx.targets import IR_VERSION, OPSET, TARGETS

from onnx_helpers import (ONNX_TOLERANCE, Block, make_moe, ort_run, ort_session, relative_error,
                          tokens)

CPU, CUDA = TARGETS["cpu"], TARGETS["cuda"]

# ----------------------------------------------------------------------------- the decision

# (make_moe kwargs, target, expected fused form or None, substring of the reason when portable)
DECISIONS = [
    (dict(activation="relu"), CPU, "relu", ""),
    (dict(activation="silu"), CPU, "silu", ""),
    (dict(activation="gelu_tanh"), CPU, "gelu", ""),
    (dict(activation="gelu"), CPU, None, "cpu kernel's gelu is the tanh form"),
    (dict(activation="gelu_tanh"), CUDA, "gelu", ""),
    (dict(activation="gelu"), CUDA, None, "cuda kernel's gelu is the tanh form"),
    (dict(activation="silu", gated=True), CPU, "swiglu", ""),
    (dict(activation="gelu_quick", gated=True), CPU, "swiglu", ""),
    (dict(activation="gelu_tanh", gated=True), CPU, None, "gates only with SwiGLU"),
    (dict(activation="gelu_quick"), CPU, None, "relu, gelu, silu and SwiGLU only"),
    (dict(activation="relu2"), CPU, None, "activation relu2"),
    (dict(activation="sigmoid", gated=True), CPU, None, "gated sigmoid"),
    (dict(routing="expert_choice"), CPU, None, "expert_choice routing"),
    (dict(capacity_factor=1.0), CPU, None, "can drop assignments"),
    (dict(capacity_factor=2.0, top_k=2), CPU, "silu", ""),            # C·k >= E: never drops
    (dict(top_k=1, normalize_weights=False), CPU, "silu", ""),
    (dict(dtype=torch.bfloat16), CPU, None, "bfloat16: the cpu kernel runs"),
    (dict(dtype=torch.bfloat16, d_model=16, d_ff=24), CUDA, "silu", ""),
    (dict(d_model=12), CUDA, None, "d_model=12"),
    (dict(activation="relu", activation_module=nn.SiLU()), CPU, None, "does not compute relu"),
]


@pytest.mark.parametrize("kwargs,target,expected,reason", DECISIONS,
                         ids=[f"{i}-{t.name}" for i, (_, t, _, _) in enumerate(DECISIONS)])
def test_fused_or_portable_decision(kwargs, target, expected, reason):
    """Each MoE is fused exactly when the node computes what it computes on that target."""
    form = fused_form(make_moe(**kwargs), target)
    if expected is None:
        assert isinstance(form, str) and reason in form, form
    else:
        assert not isinstance(form, str), form
        assert form.activation_type == expected
        if expected == "swiglu":
            assert form.swiglu_alpha == (1.702 if kwargs["activation"] == "gelu_quick" else 1.0)


def test_interleave_gate_up_layout():
    """Concatenated [gate; up] rows become gate_0, up_0, gate_1, up_1, ... (swiglu_fusion=1)."""
    d_ff = 3
    stacked = torch.arange(2 * 2 * d_ff).reshape(2, 2 * d_ff, 1).float()
    rows = interleave_gate_up(stacked, d_ff)[0, :, 0].tolist()
    assert rows == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]


# ----------------------------------------------------------------------------- lowerings in PyTorch

FUSED_CASES = [
    dict(activation="relu"), dict(activation="silu", bias=False), dict(activation="gelu_tanh"),
    dict(activation="silu", gated=True), dict(activation="silu", gated=True, bias=False),
    dict(activation="gelu_quick", gated=True), dict(activation="relu", top_k=1),
    dict(activation="silu", normalize_weights=False, top_k=3),
]


@pytest.mark.parametrize("kwargs", FUSED_CASES, ids=lambda k: "-".join(f"{v}" for v in k.values()))
def test_fused_lowering_eager_matches_moe(kwargs):
    """The custom op's eager reference (onnxruntime's semantics) with the packed weights
    computes what MoE.forward computes: the mapping to the node is right before ORT runs it."""
    moe = make_moe(**kwargs)
    form = fused_form(moe, CPU)
    assert not isinstance(form, str), form
    fc1, fc1_bias = packed_fc1(moe.experts, form)
    if form.activation_type == "swiglu":
        moe.experts.register_buffer("onnx_fc1", fc1)
        moe.experts.register_buffer("onnx_fc1_bias", fc1_bias)
    x = tokens(3, 7)
    with torch.no_grad():
        assert relative_error(fused_forward(moe, form, x).numpy(), moe(x)) < 1e-5


# Routing settings whose capacities are exercised at token counts around the thresholds.
ROUTINGS = [
    dict(top_k=2), dict(top_k=2, normalize_weights=False), dict(top_k=1),
    dict(top_k=1, capacity_factor=1.0), dict(top_k=2, capacity_factor=0.5),
    dict(top_k=2, capacity_factor=1.0), dict(top_k=3, capacity_factor=0.7, normalize_weights=False),
    dict(routing="expert_choice"), dict(routing="expert_choice", capacity_factor=1.0),
    dict(routing="expert_choice", capacity_factor=0.3),
]


@pytest.mark.parametrize("settings", ROUTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_portable_lowering_matches_moe(settings):
    """The standard-op formulation computes the core routing (incl. capacity dropping and
    expert choice) and dispatch, for token counts on and off the capacity boundaries."""
    moe = make_moe(activation="relu2", **settings)
    dropped = 0
    for num_tokens in (1, 5, 8, 13, 33, 64):
        x = tokens(1, num_tokens)
        with torch.no_grad():
            assert relative_error(portable_forward(moe, x).numpy(), moe(x)) < 1e-5, num_tokens
        dropped += moe.last_dropped.item()
    if settings.get("capacity_factor") and settings.get("routing") != "expert_choice":
        assert dropped > 0, "the capacity cases must really drop assignments"


# ----------------------------------------------------------------------------- onnxruntime parity

ORT_CASES = [
    (dict(activation="relu"), True),
    (dict(activation="gelu_tanh", bias=False), True),
    (dict(activation="silu", gated=True), True),
    (dict(activation="gelu_quick", gated=True, top_k=1), True),
    (dict(activation="silu", normalize_weights=False), True),
    (dict(activation="gelu", gated=True), False),
    (dict(activation="relu2", top_k=2, capacity_factor=1.25), False),
    (dict(activation="silu", routing="expert_choice"), False),
    (dict(activation="sigmoid", gated=True, top_k=1, normalize_weights=False), False),
]


@pytest.mark.parametrize("kwargs,fused", ORT_CASES,
                         ids=["-".join(map(str, k.values())) + f"-fused={f}" for k, f in ORT_CASES])
def test_layer_onnxruntime_parity(tmp_path, kwargs, fused):
    """One exported layer runs in onnxruntime at two batch x seq sizes and matches PyTorch; the
    report says how it was lowered and the graph holds one com.microsoft::MoE node per fused layer."""
    block = Block(make_moe(**kwargs))
    path = export_onnx(block, tmp_path / "layer.onnx", args=(tokens(2, 6),))
    assert path.report.layers[0].lowering == ("fused" if fused else "portable")
    nodes = [n for n in onnx.load(str(path)).graph.node if n.domain == "com.microsoft"]
    assert len(nodes) == int(fused)
    session = ort_session(path)
    for batch, seq in [(3, 5), (1, 17)]:
        x = tokens(batch, seq)
        with torch.no_grad():
            assert relative_error(ort_run(session, {"x": x}), block(x)) <= ONNX_TOLERANCE


@pytest.mark.parametrize("fused", [True, False])
def test_every_expert_kept_when_exported_with_one_token(tmp_path, fused):
    """Exported with a single token (which reaches only k experts), the file still holds all E
    experts and matches PyTorch on a batch that uses every expert."""
    block = Block(make_moe(activation="silu", gated=True, num_experts=8))
    path = export_onnx(block, tmp_path / "one.onnx", args=(tokens(1, 1),), fused=fused)
    x = tokens(4, 16)
    with torch.no_grad():
        expected = block(x)
    assert (block.moe.last_expert_load > 0).all(), "the check batch must reach every expert"
    stacked = [i for i in onnx.load(str(path)).graph.initializer if len(i.dims) == 3]
    assert stacked and all(i.dims[0] == 8 for i in stacked)
    assert relative_error(ort_run(ort_session(path), {"x": x}), expected) <= ONNX_TOLERANCE


def test_file_format(tmp_path):
    """IR version and opsets onnxruntime >= 1.28 loads, symbolic batch/seq dims, weights as
    initializers (not inputs), and the MoE node carries only the attributes we set."""
    block = Block(make_moe(activation="silu", gated=True))
    path = export_onnx(block, tmp_path / "f.onnx", args=(tokens(2, 3),))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version == IR_VERSION <= 13
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import} == {"ai.onnx": OPSET, "com.microsoft": 1}
    (graph_input,) = model.graph.input
    assert [d.dim_param for d in graph_input.type.tensor_type.shape.dim][:2] == ["batch", "seq"]
    initializers = {i.name for i in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "MoE"]
    assert {node.input[2], node.input[3], node.input[4], node.input[5]} <= initializers
    assert {a.name for a in node.attribute} == {"k", "activation_type", "normalize_routing_weights",
                                                "swiglu_fusion", "activation_alpha", "activation_beta"}


def test_external_data_above_the_size_limit(tmp_path, monkeypatch):
    """Above the limit (2 GB; lowered here) the weights go to external data and the file still
    passes onnx.checker and runs."""
    monkeypatch.setattr(export_module, "LARGE_MODEL_BYTES", 1024)
    block = Block(make_moe(activation="relu"))
    path = export_onnx(block, tmp_path / "big.onnx", args=(tokens(2, 3),))
    assert path.report.external_data
    assert any(p.name != "big.onnx" for p in tmp_path.iterdir()), "no external data file written"
    x = tokens(2, 9)
    with torch.no_grad():
        assert relative_error(ort_run(ort_session(path), {"x": x}), block(x)) <= ONNX_TOLERANCE


def test_export_leaves_the_model_unchanged(tmp_path):
    """Training mode, buffers, forward and parameters are as before; the layer still records
    its statistics in its own forward."""
    block = Block(make_moe(activation="silu", gated=True)).train()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    export_onnx(block, tmp_path / "m.onnx", args=(tokens(2, 3),))
    assert block.training and block.moe.training
    assert "forward" not in vars(block.moe)
    assert block.state_dict().keys() == before.keys()
    assert all(torch.equal(block.state_dict()[k], v) for k, v in before.items())
    block.eval()(tokens(1, 4))
    assert block.moe.last_expert_load.sum().item() == 4 * block.moe.settings.top_k


def test_report_is_logged_and_lists_absent_layers(tmp_path, caplog):
    """A MoE layer the example inputs never run is reported as absent, not as exported."""

    class TwoPaths(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = make_moe(activation="relu"), make_moe(activation="relu2", seed=3)

        def forward(self, x):
            return self.used(x)

    with caplog.at_level(logging.INFO, logger="upcycle_fx.exporters.onnx"):
        path = export_onnx(TwoPaths(), tmp_path / "t.onnx", args=(tokens(1, 2),))
    lowering = {layer.name: layer.lowering for layer in path.report.layers}
    assert lowering == {"used": "fused", "unused": "absent"}
    assert "fused    used" in caplog.text and "absent   unused" in caplog.text


def test_portable_layers_and_fused_false(tmp_path):
    """fused=False and portable_layers make fusable layers portable, with the reason."""
    block = Block(make_moe(activation="relu"))
    listed = export_onnx(block, tmp_path / "a.onnx", args=(tokens(1, 2),), portable_layers=["moe"])
    off = export_onnx(block, tmp_path / "b.onnx", args=(tokens(1, 2),), fused=False)
    assert listed.report.layers[0].detail == "listed in portable_layers"
    assert off.report.layers[0].detail == "fused=False" and off.report.fused == []


@pytest.mark.parametrize("call,message", [
    (lambda p: export_onnx(Block(make_moe()), io.BytesIO(), args=(tokens(1, 2),)), "must be a file path"),
    (lambda p: export_onnx(Block(make_moe()), p, args=(tokens(1, 2),), target="tpu"), "target='tpu' is unknown"),
    (lambda p: export_onnx(Block(make_moe()), p), "needs example inputs"),
    (lambda p: export_onnx(Block(make_moe()), p, args=(tokens(1, 2),), portable_layers=["nope"]),
     "portable_layers names no MoE layer"),
    (lambda p: export_onnx(Block(make_moe()), p, args=(tokens(1, 2),), fused="no"), "fused='no' must be True"),
    (lambda p: export_onnx(Block(make_moe()), p, args=(tokens(1, 2),), optimize=1), "optimize=1 must be True"),
    (lambda p: export_onnx(Block(make_moe()), p, args=tokens(1, 2)), "args of type Tensor must be a tuple"),
    (lambda p: export_onnx(Block(make_moe()), p, args=(tokens(1, 2),), portable_layers=3),
     "portable_layers=3 must be a list"),
    (lambda p: export_onnx(Block(make_moe()), p, args=("not a tensor",)), "does not run on the example inputs"),
    (lambda p: export_onnx(Block(make_moe()), p, args=(torch.randn(1, 2, 5),)), "does not run on the example inputs"),
])
def test_named_errors(tmp_path, call, message):
    with pytest.raises(OnnxExportError, match=message):
        call(tmp_path / "e.onnx")


def test_untraceable_model_is_a_named_error(tmp_path):
    """A forward torch.export cannot capture (data-dependent Python control flow) raises
    OnnxExportError naming the model and torch's reason."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = make_moe()

        def forward(self, x):
            return self.moe(x) if x.sum() > 0 else x

    with pytest.raises(OnnxExportError, match="could not export Branchy") as error:
        export_onnx(Branchy(), tmp_path / "b.onnx", args=(tokens(1, 2),))
    assert isinstance(error.value, upcycle_fx.UpcycleError)


def test_bare_moe_module(tmp_path):
    """An MoE module exported on its own is the model's only layer, named <model> in the report."""
    moe = make_moe(activation="silu", gated=True)
    path = export_onnx(moe, tmp_path / "bare.onnx", args=(tokens(2, 3),))
    assert path.report.fused == [""] and "fused    <model>:" in str(path.report)
    assert "forward" not in vars(moe)
    x = tokens(3, 4)
    with torch.no_grad():
        assert relative_error(ort_run(ort_session(path), {"x": x}), moe(x)) <= ONNX_TOLERANCE


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("biased", ["gate", "up"])
def test_bias_on_one_half_exports_exactly(tmp_path, biased, fused):
    """A gated FFN with a bias on only its gate (or up) projection keeps that bias alone; both
    lowerings pad it back to the full fc1 rows, and onnxruntime matches PyTorch; a native
    checkpoint gives it back bit for bit."""
    from test_moe import _HalfBiasGLU

    torch.manual_seed(0)
    dense = nn.Sequential(_HalfBiasGLU(biased, d=16, f=24), _HalfBiasGLU(biased, d=16, f=24)).eval()
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, router_init_std=1.0).eval()
    path = export_onnx(sparse, tmp_path / "half.onnx", args=(tokens(2, 6),), fused=fused)
    assert path.report.layers[0].lowering == ("fused" if fused else "portable")
    x = tokens(3, 5)
    with torch.no_grad():
        assert relative_error(ort_run(ort_session(path), {"input": x}), sparse(x)) <= ONNX_TOLERANCE
    upcycle_fx.save(sparse, tmp_path / "ckpt")
    loaded = upcycle_fx.load(tmp_path / "ckpt", nn.Sequential(_HalfBiasGLU(biased, d=16, f=24),
                                                               _HalfBiasGLU(biased, d=16, f=24)))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), sparse(x))
