"""The routing options of the field: sigmoid scores with bias balancing (DeepSeek-V3), softmax
then top-k with 2410.07524's weight scaling, and the config errors for combinations that cannot
work; on every dispatch path, through save/load, from_pretrained and ONNX."""

from __future__ import annotations

import pytest
import torch

import upcycle_fx
from upcycle_fx import UpcycleConfig, UpcycleConfigError
from upcycle_fx.moe import MoE, MoESettings, Router
from upcycle_fx.moe.dispatch import dispatch
from upcycle_fx.moe.experts import Experts
from upcycle_fx.moe.routing import top_k_routing
from upcycle_fx.report import relative_error

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 96


def llama(dtype=torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, dtype=dtype)


def ids(batch=2, seq=8, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits_of(model, tokens):
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def conversion_error(**options) -> float:
    dense = llama()
    sparse = upcycle_fx.rewrite(dense, num_experts=8, seed=0, **options)
    tokens = ids()
    return relative_error(logits_of(sparse, tokens), logits_of(dense, tokens))


# --------------------------------------------------------------------------- function preservation


def test_sigmoid_with_bias_balancing_preserves_the_function():
    """Sigmoid scores, renormalised top-k, bias balancing: the dense function at conversion
    (float32, 1e-5), verified by rewrite itself too."""
    assert conversion_error(scoring="sigmoid", balancing="bias") <= 1e-5


def test_sigmoid_preserves_the_function_with_a_trained_bias():
    """A non-zero bias changes which experts are chosen, never the sum of the (renormalised)
    weights: identical experts still give the dense FFN."""
    dense = llama()
    sparse = upcycle_fx.rewrite(dense, num_experts=8, seed=0, scoring="sigmoid", balancing="bias")
    for _, moe in upcycle_fx.moe_layers(sparse):
        moe.expert_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    tokens = ids()
    assert relative_error(logits_of(sparse, tokens), logits_of(dense, tokens)) <= 1e-5


def test_weight_scaling_is_exact_under_uniform_routing():
    """Softmax then top-k without renormalisation, weights scaled by E/k: with a zero router
    (uniform routing) the top-k mass is exactly k/E, so the layer is the dense FFN (1e-5)."""
    assert conversion_error(normalize_weights=False, weight_scaling=True, router_init_std=0.0) <= 1e-5
    assert conversion_error(normalize_weights=False, weight_scaling=True, router_init_std=0.0,
                            scoring="sigmoid") <= 1e-5


def layer_error(**options) -> float:
    """Relative error of the second layer's MoE against its dense FFN on N(0, 1) hidden states."""
    dense = llama()
    sparse = upcycle_fx.rewrite(dense, num_experts=8, seed=0, **options)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return relative_error(sparse.model.layers[1].mlp.eval()(x), dense.model.layers[1].mlp(x))


def test_weight_scaling_is_approximate_with_a_random_router():
    """With the usual N(0, 0.02) router the top-k mass is k/E only on average: the scaled layer
    is near the dense FFN (0.20 here: the chosen experts' logits sit above the mean), the
    unscaled one is off by about 1 - k/E = 0.75; a zero router makes the scaling exact."""
    scaled = layer_error(normalize_weights=False, weight_scaling=True)
    unscaled = layer_error(normalize_weights=False)
    assert 0 < scaled < 0.3
    assert unscaled == pytest.approx(0.75, abs=0.05)
    assert layer_error(normalize_weights=False, weight_scaling=True, router_init_std=0.0) <= 1e-5


def test_a_routed_scaling_factor_is_not_taken_for_function_preserving():
    """normalize_weights with a factor != 1 doubles the FFN: rewrite does not take it for
    function-preserving (its verification would refuse the model with RewriteError)."""
    assert layer_error(routed_scaling_factor=2.0) == pytest.approx(1.0, abs=1e-5)


# --------------------------------------------------------------------------- routing semantics


def test_bias_chooses_the_experts_and_scores_weigh_them():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    routing = top_k_routing(logits, 2, normalize=False, scoring="sigmoid", bias=bias)
    first = routing.expert_idx[:6]
    assert torch.equal(first, torch.full((6,), 3))           # the bias picks expert 3 first
    torch.testing.assert_close(routing.weight[:6], torch.sigmoid(logits[:, 3]))  # unbiased weights
    normalized = top_k_routing(logits, 2, normalize=True, scoring="sigmoid", bias=bias)
    torch.testing.assert_close(normalized.weight.view(2, 6).sum(0), torch.ones(6))
    torch.testing.assert_close(normalized.probs.sum(-1), torch.ones(6))  # P_e of the loss


def _moe(settings: MoESettings, num_experts=6, d=16, f=24, seed=0) -> MoE:
    g = torch.Generator().manual_seed(seed)
    experts = Experts(num_experts, d, f, gated=True, activation=torch.nn.SiLU(), activation_name="silu",
                      up_bias=True, down_bias=True)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return MoE(Router(d, num_experts, init_std=1.0, generator=g), experts, settings)


def test_the_optimizer_step_moves_the_bias_by_the_sign_of_the_load_gap():
    """After a training step of any torch optimizer, b_e += speed · sign(mean − load_e) over the
    step's loads (both micro-batches); a second after_optimizer_step changes nothing; eval
    forwards are not counted."""
    moe = _moe(MoESettings(scoring="sigmoid", balancing="bias", bias_update_speed=0.01))
    optimizer = torch.optim.SGD(moe.parameters(), lr=0.0)
    loads = torch.zeros(6, dtype=torch.float64)
    for seed in (1, 2):
        x = torch.randn(10, 16, generator=torch.Generator().manual_seed(seed))
        moe(x).sum().backward()
        loads += moe.last_expert_load.double()
    with torch.no_grad():
        moe.eval()(torch.randn(50, 16))
    moe.train()
    optimizer.step()
    expected = 0.01 * torch.sign(loads.mean() - loads).float()
    assert (expected != 0).any()
    torch.testing.assert_close(moe.expert_bias, expected, rtol=0, atol=0)
    upcycle_fx.after_optimizer_step(moe)
    torch.testing.assert_close(moe.expert_bias, expected, rtol=0, atol=0)


def test_after_optimizer_step_serves_optimizers_that_are_not_torch_optimizers():
    moe = _moe(MoESettings(scoring="sigmoid", balancing="bias"))
    moe(torch.randn(12, 16))
    assert torch.count_nonzero(moe.expert_bias) == 0
    upcycle_fx.after_optimizer_step(moe)
    assert torch.count_nonzero(moe.expert_bias) > 0
    assert moe.expert_bias.abs().max() == pytest.approx(0.001)


def test_bias_stays_float32_when_the_model_is_cast():
    moe = _moe(MoESettings(scoring="sigmoid", balancing="bias"))
    moe.expert_bias.fill_(0.123456789)
    moe.to(torch.bfloat16)
    assert moe.expert_bias.dtype == torch.float32
    assert moe.expert_bias[0].item() == pytest.approx(0.123456789, abs=1e-8)
    assert moe.router.weight.dtype == torch.bfloat16


def test_the_bias_buffer_exists_exactly_where_the_balancer_needs_it():
    assert "expert_bias" not in dict(_moe(MoESettings()).named_buffers())
    moe = _moe(MoESettings(balancing="bias"))
    assert "expert_bias" in moe.state_dict()
    moe.settings = MoESettings()
    assert "expert_bias" not in moe.state_dict()


# --------------------------------------------------------------------------- every dispatch path

OPTIONS = {
    "sigmoid-bias": dict(scoring="sigmoid", balancing="bias"),
    "sigmoid-bias-capacity": dict(scoring="sigmoid", balancing="bias", capacity_factor=0.75),
    "softmax-scaled": dict(normalize_weights=False, weight_scaling=True),
    "sigmoid-scaled-capacity": dict(scoring="sigmoid", normalize_weights=False, weight_scaling=True,
                                    capacity_factor=1.0),
    "sigmoid-expert-choice": dict(scoring="sigmoid", routing="expert_choice"),
    "routed-scaling": dict(scoring="sigmoid", routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS)
def test_every_dispatch_path_agrees_with_the_loop_oracle(options):
    """auto (grouped or batched) and grouped/batched where they apply == loop: values and gradients."""
    moe = _moe(MoESettings(**options))
    if "expert_bias" in moe._buffers:
        moe.expert_bias.copy_(torch.linspace(-0.3, 0.3, 6))
    x = torch.randn(13, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    routing = moe.route(moe.router(x))
    impls = ["auto", "loop", "batched" if routing.slots is not None else "grouped"]
    results = {}
    for impl in impls:
        routing = moe.route(moe.router(x))
        out = dispatch(x, routing, moe.experts, impl)
        weight = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad((out * weight).sum(), [x, moe.router.weight, moe.experts.up_proj])
        results[impl] = (out, grads)
    for impl in impls:
        torch.testing.assert_close(results[impl][0], results["loop"][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(results[impl][1], results["loop"][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- checkpoints and ONNX


def _trained_bias_model():
    model = upcycle_fx.rewrite(llama(), num_experts=4, seed=0, scoring="sigmoid", balancing="bias",
                               bias_update_speed=0.05, balance_scope="global_batch",
                               normalize_weights=False, weight_scaling=True)
    for _, moe in upcycle_fx.moe_layers(model):
        moe.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
    return model


def _assert_same_routing_model(loaded, original):
    for (_, a), (_, b) in zip(upcycle_fx.moe_layers(loaded), upcycle_fx.moe_layers(original)):
        assert a.settings == b.settings
        assert a.expert_bias.dtype == torch.float32
        assert torch.equal(a.expert_bias, b.expert_bias)
    tokens = ids()
    assert torch.equal(logits_of(loaded, tokens), logits_of(original, tokens))


def test_native_save_and_load_keep_the_options_and_the_bias(tmp_path):
    model = _trained_bias_model()
    upcycle_fx.save(model, tmp_path / "ckpt")
    _assert_same_routing_model(upcycle_fx.load(tmp_path / "ckpt"), model)


def test_saving_in_another_dtype_keeps_the_bias_in_float32(tmp_path):
    """save(dtype="bfloat16") casts the weights, not the bias (before the fix it was rounded to
    bf16: 0.3 came back as 0.30078125)."""
    model = _trained_bias_model()
    upcycle_fx.save(model, tmp_path / "ckpt", dtype="bfloat16")
    loaded = upcycle_fx.moe_layers(upcycle_fx.load(tmp_path / "ckpt"))[0][1]
    assert loaded.router.weight.dtype == torch.bfloat16
    assert loaded.expert_bias.dtype == torch.float32
    assert torch.equal(loaded.expert_bias, upcycle_fx.moe_layers(model)[0][1].expert_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_pretrained_rebuilds_the_options_and_loads_the_bias(tmp_path, dtype):
    model = _trained_bias_model().to(dtype)
    model.save_pretrained(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=dtype)
    _assert_same_routing_model(loaded, model)


ONNX_CASES = {  # options -> the reason the layer is portable (None: the fused node expresses it)
    "sigmoid-bias": (dict(scoring="sigmoid", balancing="bias"), "no per-expert selection bias"),
    "scaled": (dict(normalize_weights=False, weight_scaling=True), "does not scale"),
    "routed-scaling": (dict(scoring="sigmoid", routed_scaling_factor=2.5), "does not scale"),
    "sigmoid-unnormalised": (dict(scoring="sigmoid", normalize_weights=False), "normalises the scores"),
    "sigmoid-normalised": (dict(scoring="sigmoid"), None),
    "sigmoid-normalised-top1": (dict(scoring="sigmoid", top_k=1), None),
}


@pytest.mark.parametrize("options,reason", ONNX_CASES.values(), ids=ONNX_CASES)
def test_onnx_export_lowers_each_option_and_matches(tmp_path, options, reason):
    """The fused node routes by softmax(input) then top-k: fed logsigmoid(logits) it computes
    sigmoid scores with renormalised weights exactly; bias, scaling or unnormalised sigmoid
    weights take the portable lowering with the reason. onnxruntime matches PyTorch (1e-4)."""
    pytest.importorskip("onnxruntime")
    from onnx_helpers import ONNX_TOLERANCE, Block, ort_run, ort_session, tokens
    from onnx_helpers import relative_error as ort_error

    moe = _moe(MoESettings(**options)).eval()
    if "expert_bias" in moe._buffers:
        moe.expert_bias.copy_(torch.linspace(-0.3, 0.3, 6))
    block = Block(moe)
    path = upcycle_fx.export_onnx(block, tmp_path / "layer.onnx", args=(tokens(2, 6),))
    layer = path.report.layers[0]
    if reason is None:
        assert layer.lowering == "fused", layer.detail
    else:
        assert layer.lowering == "portable" and reason in layer.detail, layer.detail
    session = ort_session(path)
    for batch, seq in [(3, 5), (1, 17)]:
        x = tokens(batch, seq)
        with torch.no_grad():
            assert ort_error(ort_run(session, {"x": x}), block(x)) <= ONNX_TOLERANCE


# --------------------------------------------------------------------------- config errors

ERRORS = [
    (dict(scoring="tanh"), "scoring='tanh' is unknown"),
    (dict(balancing="sinkhorn"), "balancing='sinkhorn' is unknown"),
    (dict(balancing="bias", bias_update_speed=0.0), "bias_update_speed=0.0 must be a finite number > 0"),
    (dict(balancing="bias", bias_update_speed=-1e-3), "bias_update_speed=-0.001"),
    (dict(balancing="bias", routing="expert_choice"), "expert_choice routing lets experts choose"),
    (dict(balance_scope="step"), "balance_scope='step' is unknown"),
    (dict(balance_scope="global_batch", routing="expert_choice"), "expert_choice routing has none"),
    (dict(weight_scaling=True), "normalize_weights=True they already sum to 1"),
    (dict(weight_scaling=True, normalize_weights=False, routing="expert_choice"), "applies to top-k"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor=0.0 must be a finite number > 0"),
    (dict(routed_scaling_factor=float("nan")), "routed_scaling_factor=nan"),
    (dict(weight_scaling="yes", normalize_weights=False), "weight_scaling='yes' must be True or False"),
]


@pytest.mark.parametrize("options,message", ERRORS, ids=[m for _, m in ERRORS])
def test_impossible_combinations_are_named_errors_before_any_work(options, message):
    with pytest.raises(UpcycleConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        UpcycleConfig(**options)


def test_rewrite_refuses_before_touching_the_model():
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UpcycleConfigError, match="bias_update_speed"):
        upcycle_fx.rewrite(model, balancing="bias", bias_update_speed=-1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- the command line


def test_cli_rewrites_a_directory_with_the_routing_options(tmp_path):
    """`upcycle-fx rewrite DIR --scoring sigmoid --balancing bias ...` as a subprocess: the
    checkpoint loads with from_pretrained with those settings; a bad combination exits 2."""
    from cli_models import llama_dir, run_cli

    model = llama_dir(tmp_path / "dense")
    result = run_cli("rewrite", model, "--out", tmp_path / "out", "--scoring", "sigmoid",
                     "--balancing", "bias", "--bias-update-speed", "0.01", "--balance-scope", "global_batch")
    assert result.returncode == 0, result.stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    settings = upcycle_fx.moe_layers(loaded)[0][1].settings
    assert (settings.scoring, settings.balancing, settings.bias_update_speed, settings.balance_scope) == (
        "sigmoid", "bias", 0.01, "global_batch")
    refused = run_cli("rewrite", model, "--out", tmp_path / "bad", "--weight-scaling")
    assert refused.returncode == 2
    message = refused.stdout + refused.stderr
    assert "weight_scaling=True" in message and "Traceback" not in message


# --------------------------------------------------------------------------- training paths


def test_trainer_without_the_callback_still_updates_the_bias(tmp_path):
    """The optimizer step hook runs the bias update for a plain Trainer (no MoECallback)."""
    from test_hf_workflow import train

    model = upcycle_fx.rewrite(llama(), num_experts=4, seed=0, scoring="sigmoid", balancing="bias")
    train(model, tmp_path, steps=2)
    bias = upcycle_fx.moe_layers(model)[0][1].expert_bias
    assert torch.count_nonzero(bias) > 0
    steps = bias.abs() / 0.001  # two updates of ±0.001 each: 0, 1 or 2 steps away from 0
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.max() <= 2 + 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_training_step_keeps_a_float32_bias(dtype):
    model = upcycle_fx.rewrite(llama(dtype), num_experts=4, seed=0, scoring="sigmoid", balancing="bias",
                               balance_scope="global_batch").train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = ids()
    out = model(input_ids=tokens, labels=tokens)
    loss = out.loss
    assert out.logits.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    moe = upcycle_fx.moe_layers(model)[0][1]
    assert moe.expert_bias.dtype == torch.float32
    assert all(b == 0.0 or b == pytest.approx(0.001, abs=1e-9) for b in moe.expert_bias.abs().tolist())
    assert torch.count_nonzero(moe.expert_bias) > 0


def test_stock_mixtral_format_refuses_sigmoid_scores(tmp_path):
    """Sigmoid scores with renormalised weights compute the dense function at conversion, so the
    written check passes, but the stock Mixtral routes by softmax: after training it would
    choose other experts. (A routed scaling factor is refused already: the written check fails.)"""
    model = upcycle_fx.rewrite(llama(), pattern="all", num_experts=4, seed=0, scoring="sigmoid")
    with pytest.raises(upcycle_fx.HFFormatError):
        upcycle_fx.save(model, tmp_path / "hf", format="hf")


@pytest.mark.parametrize("options", [dict(scoring="sigmoid", balancing="bias"),
                                     dict(balance_scope="global_batch")], ids=["bias", "global-batch"])
def test_the_layer_compiles_into_one_graph_and_still_counts_the_step(options):
    """torch.compile(fullgraph=True) captures the training forward of a bf16 layer with per-step
    state: two compiled calls add both batches' loads / counts, as eager calls do."""
    torch._dynamo.reset()
    moe = _moe(MoESettings(**options)).to(torch.bfloat16)
    x = torch.randn(15, 16, dtype=torch.bfloat16)
    compiled = torch.compile(moe, fullgraph=True, backend="eager")
    compiled(x)
    compiled(x)
    totals = moe.step_totals
    if options.get("balancing") == "bias":
        assert float(totals.loads.sum()) == 2 * 15 * 2
    else:
        assert totals.balance[-2:].tolist() == [2 * 15 * 2, 2 * 15]


@pytest.mark.parametrize("dtype", [None, "float16"], ids=["stored-bf16", "cast-fp16"])
def test_streaming_conversion_writes_a_float32_bias(tmp_path, dtype):
    """convert_checkpoint of a bf16 checkpoint (or cast to fp16) with bias balancing: the bias is
    planned and written in float32 (before the fix: CheckpointError 'was not planned as such')."""
    from cli_models import llama_dir

    source = llama_dir(tmp_path / "dense", dtype=torch.bfloat16)
    config = UpcycleConfig(num_experts=4, scoring="sigmoid", balancing="bias", seed=0)
    upcycle_fx.convert_checkpoint(source, tmp_path / "out", config=config, dtype=dtype)
    moe = upcycle_fx.moe_layers(upcycle_fx.load(tmp_path / "out"))[0][1]
    assert moe.router.weight.dtype == (torch.float16 if dtype else torch.bfloat16)
    assert moe.expert_bias.dtype == torch.float32 and moe.settings.scoring == "sigmoid"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_dispatch_paths_of_sigmoid_bias_routing_equal_the_loop(dtype):
    """On CUDA (the Triton decode kernel for a few rows, grouped matmuls for many) a layer with
    sigmoid scores, a non-zero selection bias and scaled weights equals the loop oracle."""
    model = upcycle_fx.rewrite(llama(), pattern="all", num_experts=8, top_k=2, scoring="sigmoid",
                               balancing="bias", routed_scaling_factor=2.5, expert_noise_std=0.1,
                               router_init_std=0.5, seed=0, verify=False)
    moe = upcycle_fx.moe_layers(model)[0][1]
    with torch.no_grad():
        moe.expert_bias.copy_(torch.linspace(-0.5, 0.5, 8))
    moe = moe.to("cuda", dtype).eval()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for tokens in (3, 300):
        x = torch.randn(tokens, 32, device="cuda", dtype=dtype)
        outs = {}
        for impl in ("auto", "grouped", "loop"):
            moe.dispatch_impl = impl
            with torch.no_grad():
                outs[impl] = moe(x).float()
        for impl in ("auto", "grouped"):
            assert upcycle_fx.report.relative_error(outs[impl], outs["loop"]) <= tolerance
