"""Fine-grained (granular) experts: each FFN split into G segments, E copies of each.

The construction (`upcycle_fx.moe.segments`): expert i holds segment i mod G, router rows are
equal within each virtual group of G experts, down projections are scaled by G; with
renormalised top-K weights and K a multiple of G the layer computes the dense FFN exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

import upcycle_fx
from upcycle_fx import UpcycleConfig, UpcycleConfigError
from upcycle_fx.moe import MoE, MoESettings, Router
from upcycle_fx.moe.dispatch import dispatch
from upcycle_fx.moe.experts import Experts, FFNWeights
from upcycle_fx.moe.segments import expert_layout, tie_router_groups
from upcycle_fx.passes.verify import preserves_function

from helpers import FUNCTION_TOLERANCE, build, max_error

FAMILIES = ["llama", "gpt2", "bert", "phi3", "hw-squared-relu"]
LAYOUTS = {"E2xG4-top4": (8, 4, 4), "E6xG2-top6": (12, 6, 2), "neuron-split-G4": (4, 4, 4),
           "E3xG2-top4": (6, 4, 2)}
CASES = [(name, "E2xG4-top4") for name in FAMILIES] + [("hw-swiglu", layout) for layout in LAYOUTS]


@pytest.mark.parametrize("name, layout", CASES)
def test_granular_experts_compute_the_dense_function(name, layout):
    """Every form (gated, fused gate-up, Conv1D, biases, non-homogeneous activations), copies
    or the plain neuron split (one copy per segment: LLaMA-MoE), to <= 1e-5 in float32."""
    experts, top_k, granularity = LAYOUTS[layout]
    dense = build(name).eval()
    moe_model = upcycle_fx.rewrite(dense, "all", num_experts=experts, top_k=top_k, granularity=granularity,
                                   router_init_std=1.0, seed=0)
    layers = upcycle_fx.moe_layers(moe_model)
    assert layers and all(m.num_experts == experts and m.experts.d_ff * granularity == _d_ff(dense, m)
                          for _, m in layers)
    assert max_error(dense, moe_model, name) <= FUNCTION_TOLERANCE


def _d_ff(dense, moe: MoE) -> int:
    (match,) = [m for m in upcycle_fx.find_mlps(dense) if m.index == moe.mlp_index]
    return match.d_ff


def _ffn(d=16, f=24, gated=True, bias=True, seed=0) -> FFNWeights:
    g = torch.Generator().manual_seed(seed)
    rows = 2 * f if gated else f
    return FFNWeights(torch.randn(rows, d, generator=g), torch.randn(rows, generator=g) if bias else None,
                      torch.randn(d, f, generator=g), torch.randn(d, generator=g) if bias else None, gated)


def _dense_out(ffn: FFNWeights, x: torch.Tensor) -> torch.Tensor:
    h = torch.nn.functional.linear(x, ffn.up, ffn.up_bias)
    if ffn.gated:
        gate, up = h.chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
    else:
        h = torch.nn.functional.silu(h)
    return torch.nn.functional.linear(h, ffn.down, ffn.down_bias)


def _granular_moe(ffn: FFNWeights, num_experts: int, granularity: int, settings: MoESettings, seed=0) -> MoE:
    layout = expert_layout(ffn.d_ff, num_experts, granularity)
    experts = Experts.from_units(ffn, layout.routed_units, down_scale=layout.routed_scale,
                                 activation=torch.nn.SiLU(), activation_name="silu")
    router = Router(ffn.d_model, num_experts, init_std=1.0, generator=torch.Generator().manual_seed(seed))
    tie_router_groups(router.weight, layout.group_size)
    return MoE(router, experts, settings)


def test_expert_i_holds_segment_i_mod_g_and_router_rows_are_tied():
    ffn = _ffn(f=24)
    moe = _granular_moe(ffn, 9, 3, MoESettings(top_k=3))
    width = 8
    for i in range(9):
        segment = slice((i % 3) * width, (i % 3 + 1) * width)
        torch.testing.assert_close(moe.experts.up_proj[i, :width], ffn.up[:24][segment], rtol=0, atol=0)
        torch.testing.assert_close(moe.experts.down_proj[i], 3 * ffn.down[:, segment], rtol=0, atol=0)
        torch.testing.assert_close(moe.experts.down_bias[i], ffn.down_bias, rtol=0, atol=0)
        torch.testing.assert_close(moe.router.weight[i], moe.router.weight[(i // 3) * 3], rtol=0, atol=0)
    assert not torch.equal(moe.router.weight[0], moe.router.weight[3])


@pytest.mark.parametrize("impl", ["loop", "grouped", "auto"])
@pytest.mark.parametrize("gated", [True, False])
def test_every_dropless_dispatch_keeps_the_dense_function(impl, gated):
    ffn = _ffn(gated=gated)
    x = torch.randn(37, 16)
    moe = _granular_moe(ffn, 8, 4, MoESettings(top_k=4)).eval()
    moe.dispatch_impl = impl
    with torch.no_grad():
        expected = _dense_out(ffn, x)
        assert upcycle_fx.report.relative_error(moe(x), expected) <= FUNCTION_TOLERANCE


SETTINGS = {"dropless": MoESettings(top_k=4), "capacity": MoESettings(top_k=4, capacity_factor=1.0),
            "expert_choice": MoESettings(routing="expert_choice"),
            "unnormalised": MoESettings(top_k=2, normalize_weights=False)}


@pytest.mark.parametrize("setting", SETTINGS)
def test_fast_paths_equal_the_loop_oracle(setting):
    """Values and gradients of the auto path (grouped or batched) equal the loop's."""
    settings = SETTINGS[setting]
    moe = _granular_moe(_ffn(), 8, 4, settings)
    x = torch.randn(19, 16, requires_grad=True)
    results = {}
    for impl in ("auto", "loop"):
        logits = moe.router(x)
        routing = moe.route(logits)
        out = dispatch(x, routing, moe.experts, impl)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        results[impl] = (out, torch.autograd.grad((out * weights).sum(), [x, moe.router.weight, moe.experts.up_proj]))
    torch.testing.assert_close(results["auto"][0], results["loop"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results["auto"][1], results["loop"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_top_k_not_a_multiple_of_g_does_not_keep_the_function_and_says_so():
    """top_k=3 of G=2 groups splits a group: not function-preserving, flagged as such (the
    rewrite then runs the model once instead of verifying it against the dense one)."""
    config = UpcycleConfig(num_experts=8, top_k=3, granularity=2)
    assert not preserves_function(config)
    assert preserves_function(UpcycleConfig(num_experts=8, top_k=4, granularity=2))
    ffn = _ffn(gated=False)
    x = torch.randn(32, 16)
    moe = _granular_moe(ffn, 8, 2, MoESettings(top_k=3)).eval()
    with torch.no_grad():
        assert upcycle_fx.report.relative_error(moe(x), _dense_out(ffn, x)) > 1e-3


def test_d_ff_not_divisible_is_a_named_error_before_the_model_is_copied(monkeypatch):
    dense = build("llama")
    d_ff = upcycle_fx.find_mlps(dense)[0].d_ff
    granularity = next(g for g in range(3, 50) if d_ff % g)

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was copied before the check")

    monkeypatch.setattr(upcycle_fx.api.copy, "deepcopy", forbidden)
    with pytest.raises(UpcycleConfigError, match=rf"granularity={granularity}.*FFN #|FFN #.*granularity={granularity}"):
        upcycle_fx.rewrite(dense, num_experts=granularity, top_k=granularity, granularity=granularity)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_experts=6, granularity=4), "num_experts=6 is not a multiple of 4"),
    (dict(granularity=0), "granularity=0"),
    (dict(granularity=2.0), "granularity=2.0"),
])
def test_impossible_granular_settings_are_named(kwargs, match):
    with pytest.raises(UpcycleConfigError, match=match):
        UpcycleConfig(**kwargs)


def test_native_save_and_load_rebuild_granular_layers(tmp_path):
    dense = build("llama").eval()
    model = upcycle_fx.rewrite(dense, "all", num_experts=8, top_k=4, granularity=4, router_init_std=1.0, seed=0)
    upcycle_fx.save(model, tmp_path / "ckpt")
    loaded = upcycle_fx.load(tmp_path / "ckpt", copy.deepcopy(dense)).eval()
    for (_, a), (_, b) in zip(upcycle_fx.moe_layers(loaded), upcycle_fx.moe_layers(model)):
        assert a.settings == b.settings and a.experts.d_ff == b.experts.d_ff and a.num_experts == 8
    assert max_error(model, loaded, "llama") == 0.0
    assert max_error(dense, loaded, "llama") <= FUNCTION_TOLERANCE


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("kind, pattern, architecture", [("qwen3", "every_other_mlp", "Qwen3MoeForCausalLM"),
                                                         ("llama", "all", "MixtralForCausalLM"),
                                                         ("llama", "every_other_mlp", "Qwen2MoeForCausalLM")])
def test_stock_checkpoint_holds_fine_grained_experts(kind, pattern, architecture, tmp_path):
    """format='hf' writes the experts' width (`moe_intermediate_size`; Mixtral: `intermediate_size`)
    and the tied router rows; stock AutoModelForCausalLM gives the upcycled logits to <= 1e-5."""
    from test_hf_formats import dense, logits_error, write_and_load

    source = dense(kind, **({"head_dim": 32} if kind == "qwen3" else {}))
    model = upcycle_fx.rewrite(source, pattern, num_experts=8, top_k=4, granularity=4, router_init_std=1.0, seed=0)
    loaded, config = write_and_load(model, tmp_path / "hf")
    assert type(loaded).__name__ == architecture
    width = upcycle_fx.moe_layers(model)[0][1].experts.d_ff
    assert config["moe_intermediate_size" if architecture != "MixtralForCausalLM" else "intermediate_size"] == width
    assert config["num_experts_per_tok"] == 4
    assert logits_error(loaded, model) <= FUNCTION_TOLERANCE
    assert logits_error(loaded, source) <= FUNCTION_TOLERANCE


def test_onnx_fused_node_only_where_it_breaks_no_router_ties():
    """top_k a multiple of G picks whole groups of equal router rows: fused. Otherwise ties
    decide, which onnxruntime breaks its own way: portable, with the reason."""
    from upcycle_fx.exporters.onnx.plan import fused_form
    from upcycle_fx.exporters.onnx.targets import TARGETS

    whole = _granular_moe(_ffn(), 8, 4, MoESettings(top_k=4, granularity=4))
    split = _granular_moe(_ffn(), 8, 4, MoESettings(top_k=2, granularity=4))
    assert not isinstance(fused_form(whole, TARGETS["cpu"]), str)
    assert "splits the groups of 4 equal router rows" in fused_form(split, TARGETS["cpu"])
    with torch.no_grad():
        split.router.weight.add_(torch.randn_like(split.router.weight) * 1e-3)   # trained apart
    assert not isinstance(fused_form(split, TARGETS["cpu"]), str)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
def test_onnx_export_of_granular_layer_matches_onnxruntime(fused, tmp_path):
    from onnx_helpers import ONNX_TOLERANCE, Block, ort_run, ort_session, relative_error as ort_error, tokens

    ffn = _ffn()
    block = Block(_granular_moe(ffn, 8, 4, MoESettings(top_k=4, granularity=4)).eval())
    path = upcycle_fx.export_onnx(block, tmp_path / "layer.onnx", args=(tokens(2, 6),), fused=fused)
    assert path.report.layers[0].lowering == ("fused" if fused else "portable")
    session = ort_session(path)
    for batch, seq in [(3, 5), (1, 17)]:
        x = tokens(batch, seq)
        with torch.no_grad():
            assert ort_error(ort_run(session, {"x": x}), block(x)) <= ONNX_TOLERANCE
            dense = x + _dense_out(ffn, x)
            assert ort_error(ort_run(session, {"x": x}), dense) <= ONNX_TOLERANCE


def test_save_pretrained_and_streaming_conversion_hold_granular_layers(tmp_path):
    """save_pretrained/from_pretrained (the quantizer path rebuilds from the stored settings) and
    convert_checkpoint (layer by layer, never the whole model) give the same fine-grained model."""
    import transformers

    from cli_models import llama_dir

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))

    def logits_error(a, b):
        with torch.no_grad():
            return upcycle_fx.report.relative_error(a(input_ids=ids).logits, b(input_ids=ids).logits)

    source = llama_dir(tmp_path / "llama")
    dense = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
    config = UpcycleConfig(pattern="all", num_experts=8, top_k=4, granularity=4, router_init_std=1.0, seed=0)
    model = upcycle_fx.upcycle(dense, config).model.eval()
    model.save_pretrained(tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True).eval()
    assert logits_error(reloaded, model) == 0.0
    assert all(m.settings.granularity == 4 and m.experts.d_ff == 16 for _, m in upcycle_fx.moe_layers(reloaded))
    upcycle_fx.convert_checkpoint(source, tmp_path / "streamed", config)
    streamed = upcycle_fx.load(tmp_path / "streamed").eval()
    assert logits_error(streamed, model) == 0.0
    assert logits_error(streamed, dense) <= FUNCTION_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_granular_and_shared_pass_the_rewrites_own_check(dtype):
    """In bf16/fp16 the scaled down projections round once more; the rewrite's check against the
    dense model (its dtype's tolerance) still passes, or it would raise RewriteError."""
    from test_hf_formats import dense

    model = dense("llama").to(dtype)
    result = upcycle_fx.upcycle(model, UpcycleConfig(pattern="all", num_experts=6, top_k=3, granularity=4,
                                                     num_shared_experts=1, shared_expert_gate=True, seed=0))
    assert result.verified_error is not None and result.verified_error <= {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_dispatch_paths_of_a_granular_shared_layer_equal_the_loop(dtype):
    """On CUDA (grouped_mm in bf16, the decode kernel for small batches) the granular layer with
    shared experts equals the loop oracle."""
    from upcycle_fx.moe.shared import SharedExperts
    from upcycle_fx.moe.segments import expert_layout as layout_of

    ffn = _ffn(d=64, f=128)
    layout = layout_of(128, 6, 4, 1, True)
    experts = Experts.from_units(ffn, layout.routed_units, down_scale=layout.routed_scale,
                                 activation=torch.nn.SiLU(), activation_name="silu")
    router = Router(64, 6, init_std=1.0, generator=torch.Generator().manual_seed(0))
    tie_router_groups(router.weight, layout.group_size)
    moe = MoE(router, experts, MoESettings(top_k=3, granularity=4, num_shared_experts=1, shared_expert_gate=True))
    moe.shared = SharedExperts.build(ffn, layout.shared_units, 1, scale=layout.shared_scale, gated=True,
                                     activation=torch.nn.SiLU(), activation_name="silu", hidden_dropout=0.0)
    moe = moe.to("cuda", dtype).eval()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for tokens in (3, 300):
        x = torch.randn(tokens, 64, device="cuda", dtype=dtype)
        outs = {}
        for impl in ("auto", "grouped", "loop"):
            moe.dispatch_impl = impl
            with torch.no_grad():
                outs[impl] = moe(x).float()
        for impl in ("auto", "grouped"):
            assert upcycle_fx.report.relative_error(outs[impl], outs["loop"]) <= tolerance
        with torch.no_grad():
            dense_out = _dense_out(ffn.__class__(*(t.to("cuda", dtype) if torch.is_tensor(t) else t for t in
                                                   (ffn.up, ffn.up_bias, ffn.down, ffn.down_bias, ffn.gated))), x)
        assert upcycle_fx.report.relative_error(outs["loop"], dense_out.float()) <= tolerance
