"""FFN activations: recognised by what they do (an element-wise probe), and named ones as one
record each (`upcycle_fx.activations`) that the patterns, the probe, the reports, the ONNX
export and the Triton decode kernel all read."""

from __future__ import annotations

import importlib.util
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import upcycle_fx
from upcycle_fx.activations import (Activation, OnnxForm, add_activation, describe, elementwise_problem,
                                    get_activation, remove_activation)
from upcycle_fx.activations.elementwise import module_problem
from upcycle_fx.moe.activations import probe
from upcycle_fx.report import activation_paths

transformers = pytest.importorskip("transformers")
HAS_TRITON = importlib.util.find_spec("triton") is not None


def tiny_bloom():
    torch.manual_seed(0)
    config = transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(config).eval()


def tiny_apertus():
    torch.manual_seed(0)
    config = transformers.ApertusConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)
    return transformers.ApertusForCausalLM(config).eval()


def ids(batch: int = 2, seq: int = 7) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ----------------------------------------------------------------------------- by behaviour


def test_bloom_gelu_is_found_by_behaviour_and_converts_exactly():
    """BloomGelu (a module of its own, not a known class) is accepted because it is element-wise;
    the experts call a copy of it; the upcycled model computes the dense function (1e-5)."""
    dense = tiny_bloom()
    found = upcycle_fx.find_mlps(dense)
    assert [(m.kind, m.activation) for m in found] == [("dense", "BloomGelu")] * 2
    assert describe(found[0].activation) == "element-wise `BloomGelu`"
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2)
    for _, moe in upcycle_fx.moe_layers(sparse):
        assert type(moe.experts.activation).__name__ == "BloomGelu"
    with torch.no_grad():
        assert relative(sparse(ids()).logits, dense(ids()).logits) <= 1e-5


def test_xielu_parameters_are_copied_into_the_experts_and_train():
    """Apertus's xIELU has parameters: the experts get their own copy (equal values, not the
    dense model's tensors), the function is preserved, and the copy receives gradients."""
    dense = tiny_apertus()
    found = upcycle_fx.find_mlps(dense)
    assert [m.activation for m in found] == ["XIELUActivation"] * 2
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2)
    for (name, moe), layer in zip(upcycle_fx.moe_layers(sparse), dense.model.layers):
        own, original = moe.experts.activation, layer.mlp.act_fn
        assert type(own).__name__ == "XIELUActivation"
        assert torch.equal(own.alpha_p, original.alpha_p) and own.alpha_p is not original.alpha_p
        assert torch.equal(own.alpha_n, original.alpha_n) and torch.equal(own.beta, original.beta)
    with torch.no_grad():
        assert relative(sparse(ids()).logits, dense(ids()).logits) <= 1e-5
    sparse.train()
    sparse(ids(), labels=ids()).loss.backward()
    grads = [moe.experts.activation.alpha_p.grad for _, moe in upcycle_fx.moe_layers(sparse)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(layer.mlp.act_fn.alpha_p.grad is None for layer in dense.model.layers)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_with_unnamed_activations_convert(dtype):
    """bf16 / fp16 Bloom and Apertus convert and pass `upcycle`'s check against the dense model."""
    for dense in (tiny_bloom().to(dtype), tiny_apertus().to(dtype)):
        result = upcycle_fx.upcycle(dense, upcycle_fx.UpcycleConfig(pattern="all", num_experts=4, top_k=2, seed=0))
        assert result.verified_error is not None and len(upcycle_fx.moe_layers(result.model)) == 2


def test_save_pretrained_round_trip_keeps_the_activation_parameters(tmp_path):
    """The experts' own xIELU parameters survive stock save_pretrained / from_pretrained."""
    sparse = upcycle_fx.rewrite(tiny_apertus(), "all", num_experts=4, top_k=2)
    with torch.no_grad():
        for _, moe in upcycle_fx.moe_layers(sparse):
            moe.experts.activation.alpha_p.add_(0.25)   # now differs from the dense model's
        want = sparse(ids()).logits
    sparse.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    layers = upcycle_fx.moe_layers(loaded)
    assert len(layers) == 2
    for (_, got), (_, saved) in zip(layers, upcycle_fx.moe_layers(sparse)):
        assert torch.equal(got.experts.activation.alpha_p, saved.experts.activation.alpha_p)
    with torch.no_grad():
        assert relative(loaded(ids()).logits, want) <= 1e-6


class Block(nn.Module):
    """x + down(h(up(x))) with `h` any function of the hidden units."""

    def __init__(self, h, d: int = 16, f: int = 48):
        super().__init__()
        self.up, self.down, self.h = nn.Linear(d, f), nn.Linear(f, d), h

    def forward(self, x):
        return x + self.down(self.h(self.up(x)))


class GatedBlock(nn.Module):
    """Falcon-H1's FFN: up(x) * silu(gate(x) * 0.5), then down."""

    def __init__(self, d: int = 16, f: int = 48):
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(d, f), nn.Linear(d, f), nn.Linear(f, d), nn.SiLU()

    def forward(self, x):
        return x + self.down(self.up(x) * self.act(self.gate(x) * 0.5))


@pytest.mark.parametrize("h,name", [
    (lambda t: torch.erf(t), "erf"),
    (lambda t: F.softplus(2 * t), "mul+softplus"),
    (lambda t: torch.special.expit(t) * 3.0, "special_expit+mul"),
])
def test_element_wise_calls_between_projections_are_the_activation(h, name):
    """Functions (and chains of them, constants included) that act element by element are found
    under their own names and convert exactly."""
    torch.manual_seed(0)
    dense = nn.Sequential(Block(h), Block(h)).eval()
    x = torch.randn(3, 5, 16)
    assert [m.activation for m in upcycle_fx.find_mlps(dense, (x,))] == [name, name]
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, example_inputs=(x,))
    with torch.no_grad():
        assert relative(sparse(x), dense(x)) <= 1e-5


def test_a_constant_scale_before_a_gate_activation_is_part_of_it():
    """Falcon-H1 scales the gate projection before the SiLU: the chain is the activation."""
    torch.manual_seed(0)
    dense = nn.Sequential(GatedBlock(), GatedBlock()).eval()
    x = torch.randn(3, 5, 16)
    assert [(m.kind, m.activation) for m in upcycle_fx.find_mlps(dense, (x,))] == [("gated", "mul+silu")] * 2
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, example_inputs=(x,))
    with torch.no_grad():
        assert relative(sparse(x), dense(x)) <= 1e-5


class Mixing(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, t):
        return self.how(t)


@pytest.mark.parametrize("h", [
    lambda t: torch.softmax(t, -1),                        # mixes a row
    lambda t: F.layer_norm(t, t.shape[-1:]),               # mixes a row
    lambda t: t.cumsum(-1),                                # mixes a row
    lambda t: t.flip(-1),                                  # moves elements
    lambda t: t - t.mean(0, keepdim=True),                 # mixes tokens
])
def test_what_mixes_elements_is_not_an_activation(h):
    """A function or a module that mixes elements or positions between the projections is no
    activation: nothing is found, neither as a call nor as a module."""
    x = torch.randn(3, 5, 16)
    for wrap in (lambda: h, lambda: Mixing(h)):
        dense = nn.Sequential(Block(wrap()), Block(wrap())).eval()
        assert len(upcycle_fx.find_mlps(dense, (x,))) == 0


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, t):
        self.calls += 1
        return torch.relu(t)


class InPlace(nn.Module):
    def forward(self, t):
        return t.mul_(2.0)


class Noisy(nn.Module):
    def forward(self, t):
        return t + torch.randn_like(t) if self.training else t


class TwoInputs(nn.Module):
    def forward(self, t, scale):
        return t * scale


class Halves(nn.Module):
    def forward(self, t):
        return t[..., : t.shape[-1] // 2]


@pytest.mark.parametrize("module,reason", [
    (nn.Softmax(-1), "mixes elements"),
    (nn.LayerNorm(32), "mixes elements"),
    (nn.BatchNorm1d(3), "training mode"),
    (nn.Linear(32, 32), "mixes elements"),
    (nn.Dropout1d(0.5), "not deterministic"),
    (Noisy(), "training mode it is not deterministic"),
    (Counter(), "changes its own parameters or buffers"),
    (InPlace(), "writes into its input"),
    (TwoInputs(), "exactly one input"),
    (Halves(), "not to the same shape"),
    (nn.Sequential(nn.ReLU()), "submodules"),
])
def test_the_probe_rejects_what_is_not_element_wise_and_says_why(module, reason):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    mode = module.training
    problem = module_problem(module)
    assert problem is not None and reason in problem, problem
    assert module.training == mode and all(torch.equal(before[k], v) for k, v in module.state_dict().items())


@pytest.mark.parametrize("module", [nn.Softplus(), nn.ELU(), nn.Hardtanh(), nn.GELU(), Noisy().eval(),
                                    transformers.activations.XIELUActivation()])
def test_the_probe_accepts_element_wise_modules_and_leaves_them_untouched(module):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    mode = module.training
    if isinstance(module, Noisy):   # element-wise in eval only: the experts train, so no
        assert module_problem(module) is not None
        return
    assert module_problem(module) is None
    assert module.training == mode and all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_the_probe_rejects_a_residual_from_elsewhere():
    """`down(act(up(x)) + x2)`: the add reads a second tensor, so the activation stops before it."""
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down, self.skip = nn.Linear(16, 48), nn.Linear(48, 16), nn.Linear(16, 48)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)) + self.skip(x))

    x = torch.randn(3, 5, 16)
    assert len(upcycle_fx.find_mlps(nn.Sequential(Residual(), Residual()).eval(), (x,))) == 0
    assert elementwise_problem(lambda t: t + t.roll(1, 0)) is not None


# ----------------------------------------------------------------------------- the generic paths


def test_unknown_activation_takes_the_generic_paths_and_the_reports_say_why(tmp_path):
    """BloomGelu has no record: no Triton decode kernel, no fused ONNX node; the upcycle report
    and the ONNX report name it and say why."""
    sparse = upcycle_fx.rewrite(tiny_bloom(), "all", num_experts=4, top_k=2)
    assert activation_paths(sparse) == (
        "element-wise `BloomGelu`: generic paths (no record, so no Triton decode kernel and no fused ONNX node)",)
    experts = upcycle_fx.moe_layers(sparse)[0][1].experts
    if HAS_TRITON:
        from upcycle_fx.moe.triton_decode import kernel_activation

        assert "element-wise `BloomGelu`: no Triton form" in kernel_activation(experts)
    onnx = pytest.importorskip("onnxruntime")
    del onnx
    path = upcycle_fx.export_onnx(sparse, tmp_path / "bloom.onnx", args=(ids(),))
    assert path.report.fused == []
    assert all("element-wise `BloomGelu`" in layer.detail and "no record" in layer.detail
               for layer in path.report.layers)


# ----------------------------------------------------------------------------- one record


class BentGELU(nn.Module):
    """A user's own tanh-GELU, written out by hand."""

    def forward(self, t):
        return 0.5 * t * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t * t * t)))


def bent_gelu_reference(t):
    return F.gelu(t, approximate="tanh")


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def bent_gelu_triton(z):
        return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
else:
    bent_gelu_triton = None


@pytest.fixture
def bent_gelu_record():
    record = add_activation(Activation("bent_gelu", bent_gelu_reference, modules=("BentGELU",),
                                       triton=bent_gelu_triton, onnx=OnnxForm("gelu", gelu="tanh")))
    yield record
    remove_activation("bent_gelu")


def test_a_new_activation_is_one_record_read_by_every_consumer(bent_gelu_record, tmp_path):
    """One `add_activation` record: the patterns name the FFN after it, the probe checks the
    module against its reference, the report lists its fast paths, the ONNX export fuses it
    (onnxruntime on the CPU agrees with PyTorch), and the Triton kernel has its form."""
    torch.manual_seed(0)
    dense = nn.Sequential(Block(BentGELU()), Block(BentGELU())).eval()
    x = torch.randn(3, 5, 16)
    assert [m.activation for m in upcycle_fx.find_mlps(dense, (x,))] == ["bent_gelu"] * 2
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, example_inputs=(x,))
    with torch.no_grad():
        assert relative(sparse(x), dense(x)) <= 1e-5
    experts = upcycle_fx.moe_layers(sparse)[0][1].experts
    assert experts.activation_name == "bent_gelu" and probe(experts.activation, "bent_gelu") is None
    assert "does not compute bent_gelu" in probe(nn.SiLU(), "bent_gelu")
    paths = activation_paths(sparse)
    assert len(paths) == 1 and paths[0].startswith("bent_gelu: ") and "fused ONNX node (gelu, tanh form)" in paths[0]
    assert ("Triton decode kernel" in paths[0]) == HAS_TRITON
    if HAS_TRITON:
        from upcycle_fx.moe.triton_decode import kernel_activation

        assert kernel_activation(experts) is None
    ort = pytest.importorskip("onnxruntime")
    path = upcycle_fx.export_onnx(sparse, tmp_path / "bent.onnx", args=(x,))
    assert path.report.portable == [] and all("gelu(tanh)" in layer.detail for layer in path.report.layers)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert relative(torch.from_numpy(got), sparse(x)) <= 1e-4


def test_without_its_record_the_same_module_is_element_wise_and_generic(bent_gelu_record, tmp_path):
    """Remove the record: the FFN is still found (by behaviour, under the class name), and the
    fast paths step aside."""
    remove_activation("bent_gelu")
    torch.manual_seed(0)
    dense = nn.Sequential(Block(BentGELU()), Block(BentGELU())).eval()
    x = torch.randn(3, 5, 16)
    assert [m.activation for m in upcycle_fx.find_mlps(dense, (x,))] == ["BentGELU"] * 2
    sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, example_inputs=(x,))
    assert activation_paths(sparse)[0].startswith("element-wise `BentGELU`: generic paths")
    pytest.importorskip("onnxruntime")
    path = upcycle_fx.export_onnx(sparse, tmp_path / "bent.onnx", args=(x,))
    assert path.report.fused == []


def test_a_record_with_a_swiglu_form_fuses_gated_experts(tmp_path):
    """A gate activation g·sigmoid(α·g) with α = 1.5 in one record: gated FFNs using it export as
    the fused SwiGLU node with that α."""
    class Gate(nn.Module):
        def forward(self, t):
            return t * torch.sigmoid(1.5 * t)

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up, self.down, self.act = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16), Gate()

        def forward(self, x):
            return x + self.down(self.act(self.gate(x)) * self.up(x))

    add_activation(Activation("swish_1p5", lambda t: t * torch.sigmoid(1.5 * t), modules=("Gate",),
                              onnx=OnnxForm(swiglu_alpha=1.5)))
    try:
        torch.manual_seed(0)
        dense = nn.Sequential(Gated(), Gated()).eval()
        x = torch.randn(2, 5, 16)
        sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, example_inputs=(x,))
        from upcycle_fx.exporters.onnx.plan import fused_form
        from upcycle_fx.exporters.onnx.targets import TARGETS

        form = fused_form(upcycle_fx.moe_layers(sparse)[0][1], TARGETS["cpu"])
        assert form.activation_type == "swiglu" and form.swiglu_alpha == 1.5
    finally:
        remove_activation("swish_1p5")


@pytest.mark.parametrize("record,message", [
    (Activation("not a name", torch.relu), "must be an identifier"),
    (Activation("relu", torch.relu), "registered already"),
    (Activation("x", "relu"), "not callable"),
    (Activation("x", torch.relu, chain=("relu", "cube")), "unregistered activations"),
    (Activation("x", torch.relu, onnx=OnnxForm("swish")), "is not one of"),
    (Activation("x", torch.relu, onnx=OnnxForm("gelu")), "erf"),
    (Activation("x", torch.relu, triton="no_colon"), "module:attribute"),
])
def test_add_activation_rejects_bad_records(record, message):
    with pytest.raises(upcycle_fx.UpcycleConfigError, match=message):
        add_activation(record)
    assert get_activation("x") is None and get_activation("relu").reference is torch.relu


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="the decode kernel needs CUDA")
def test_a_new_records_triton_form_runs_in_the_decode_kernel(bent_gelu_record):
    """On a GPU, the decode kernel computes the record's Triton form: it matches the loop oracle."""
    from upcycle_fx.moe.dispatch import dispatch
    from upcycle_fx.moe.experts import Experts
    from upcycle_fx.moe.routing import top_k_routing

    torch.manual_seed(0)
    for gated in (False, True):
        experts = Experts(8, 64, 96, gated=gated, activation=BentGELU(), activation_name="bent_gelu").cuda()
        with torch.no_grad():
            for p in experts.parameters():
                p.copy_(torch.randn_like(p) * 0.2)
            x = torch.randn(4, 64, device="cuda")
            routing = top_k_routing(torch.randn(4, 8, device="cuda"), 2, normalize=True)
            got = dispatch(x, routing, experts, "decode")
            want = dispatch(x, routing, experts, "loop")
        assert relative(got, want) <= 1e-5


def test_cli_streams_an_activation_with_parameters(tmp_path):
    """`upcycle-fx rewrite APERTUS_DIR --out OUT` (a subprocess on a real directory) streams the
    checkpoint: the experts' xIELU parameters are read from the input shards (they used to stay
    on the meta device, a raw NotImplementedError), and the output computes the dense function."""
    from cli_models import run_cli, snapshot

    dense = tiny_apertus()
    with torch.no_grad():
        for layer in dense.model.layers:
            layer.mlp.act_fn.alpha_p.fill_(0.3)   # not the initial value: must come from the shards
    dense.save_pretrained(tmp_path / "dense")
    before = snapshot(tmp_path / "dense")
    result = run_cli("rewrite", tmp_path / "dense", "--out", tmp_path / "out", "--pattern", "all", "--experts", "4")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert snapshot(tmp_path / "dense") == before
    sparse = upcycle_fx.load(tmp_path / "out").eval()
    for _, moe in upcycle_fx.moe_layers(sparse):
        assert torch.allclose(moe.experts.activation.alpha_p, torch.tensor([0.3]))
    with torch.no_grad():
        assert relative(sparse(ids()).logits, dense(ids()).logits) <= 1e-5


# element-wise ops that do not saturate in float32 (a chain of tanh, erf and sigmoid maps a whole
# range of inputs to exactly 1.0, and no probe can see what happens to a constant)
ELEMENT_WISE = [torch.relu, F.softplus, F.silu, torch.abs, torch.asinh, lambda t: t * 0.7, lambda t: t + 1.5,
                lambda t: t.clamp(min=-1.0), lambda t: t.to(torch.float64)]
MIXING = [lambda t: torch.softmax(t, -1), lambda t: t.cumsum(-1), lambda t: t.roll(1, -1),
          lambda t: t - t.mean(-1, keepdim=True), lambda t: t * t.sum(0, keepdim=True), lambda t: t.flip(0)]


@settings(max_examples=40, deadline=None)
@given(chain=st.lists(st.sampled_from(ELEMENT_WISE), min_size=1, max_size=4),
       mixer=st.sampled_from(MIXING), where=st.integers(0, 4))
def test_the_probe_tells_element_wise_chains_from_chains_with_one_mixing_op(chain, mixer, where):
    """Any chain of element-wise ops passes the probe; the same chain with one op that mixes
    elements or positions, anywhere in it (clamps before it included), does not. (The ops keep
    information: an op after the mixing one that maps all of its outputs to one constant would
    make the chain element-wise again.)"""
    def compose(ops):
        def fn(t):
            for op in ops:
                t = op(t)
            return t
        return fn

    assert elementwise_problem(compose(chain)) is None
    mixed = list(chain)
    mixed.insert(min(where, len(mixed)), mixer)
    assert elementwise_problem(compose(mixed)) is not None
