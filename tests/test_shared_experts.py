"""Shared experts: always-active experts beside the routed ones (DeepSeekMoE, Qwen2-MoE).

Built from the FFN so that shared plus routed compute the dense function at conversion: with
granularity G > n the first n segments are shared and the routed experts copy the other G-n;
with G = 1 the shared experts are copies and every copy carries 1/(n+1). A sigmoid gate
(Qwen2-MoE) starts at 1/2, which the shared down projection is scaled to undo.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import upcycle_fx
from upcycle_fx import HFFormatError, UpcycleConfig, UpcycleConfigError
from upcycle_fx.moe.dispatch import dispatch
from upcycle_fx.report import relative_error

from helpers import FUNCTION_TOLERANCE, build, max_error
from test_hf_formats import dense, logits_error, upcycled, write_and_load

LAYOUTS = {  # name: (num_experts, top_k, granularity, num_shared, gate)
    "copy-1-shared": (4, 2, 1, 1, False),
    "copy-2-shared-gated": (4, 2, 1, 2, True),
    "G4-1-shared": (6, 3, 4, 1, False),
    "G4-3-shared-gated": (2, 1, 4, 3, True),
    "G2-1-shared-gated": (4, 2, 2, 1, True),
}


def _rewrite(model, layout, pattern="all", **kwargs):
    experts, top_k, granularity, shared, gate = LAYOUTS[layout]
    return upcycle_fx.rewrite(model, pattern, num_experts=experts, top_k=top_k, granularity=granularity,
                              num_shared_experts=shared, shared_expert_gate=gate, router_init_std=1.0,
                              seed=0, **kwargs)


@pytest.mark.parametrize("name, layout", [("hw-swiglu", layout) for layout in LAYOUTS]
                         + [("gpt2", "G2-1-shared-gated"), ("bert", "copy-1-shared")])
def test_shared_plus_routed_compute_the_dense_function(name, layout):
    dense_model = build(name).eval()
    model = _rewrite(dense_model, layout)
    experts, _, granularity, shared, gate = LAYOUTS[layout]
    for _, moe in upcycle_fx.moe_layers(model):
        assert moe.shared.num_shared == shared and (moe.shared.gate is not None) == gate
        assert moe.shared.d_ff == shared * moe.experts.d_ff
    assert max_error(dense_model, model, name) <= FUNCTION_TOLERANCE


def test_shared_copy_with_gate_is_an_exact_copy_and_routed_experts_carry_half():
    """G=1, one gated shared expert (Qwen2-MoE upcycling): the shared expert is the FFN itself,
    its gate starts at sigmoid(0) = 1/2, and the routed copies' down projections are halved."""
    dense_model = build("hw-swiglu").eval()
    model = upcycle_fx.rewrite(dense_model, "all", num_experts=4, num_shared_experts=1, shared_expert_gate=True,
                               seed=0)
    (_, moe), *_ = upcycle_fx.moe_layers(model)
    torch.testing.assert_close(moe.shared.experts.down_proj[0] / 2, moe.experts.down_proj[0], rtol=0, atol=0)
    torch.testing.assert_close(moe.shared.experts.up_proj[0], moe.experts.up_proj[0], rtol=0, atol=0)
    assert torch.count_nonzero(moe.shared.gate.weight) == 0


@pytest.mark.parametrize("routing", [dict(), dict(capacity_factor=1.0), dict(routing="expert_choice")],
                         ids=["dropless", "capacity", "expert_choice"])
@pytest.mark.parametrize("impl", ["grouped", "batched", "auto"])
def test_every_dispatch_path_adds_the_shared_experts_like_the_loop(routing, impl):
    """Shared experts run beside any routing: each dispatch path equals the loop oracle plus the
    shared experts' output, in values and gradients."""
    if impl == "batched" and not routing:
        pytest.skip("batched takes capacity routings only")
    model = _rewrite(build("hw-swiglu"), "G4-1-shared", **routing)
    (_, moe), *_ = upcycle_fx.moe_layers(model)
    x = torch.randn(2, 9, moe.experts.d_model, requires_grad=True)
    results = {}
    for name in (impl, "loop"):
        moe.dispatch_impl = name
        out = moe(x)
        results[name] = (out, torch.autograd.grad(out.square().sum(), [x, moe.shared.experts.up_proj]))
    tokens = x.detach().reshape(-1, x.shape[-1])
    routed = dispatch(tokens, moe.route(moe.router(tokens)), moe.experts, "loop")
    torch.testing.assert_close(results["loop"][0].detach().reshape(tokens.shape), routed + moe.shared(tokens).detach())
    torch.testing.assert_close(results[impl][0], results["loop"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[impl][1], results["loop"][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_gate_is_trainable_and_changes_the_shared_share():
    model = _rewrite(build("hw-swiglu"), "G2-1-shared-gated")
    (_, moe), *_ = upcycle_fx.moe_layers(model)
    x = torch.randn(5, moe.experts.d_model)
    before = moe(x).detach()
    moe(x).sum().backward()
    assert moe.shared.gate.weight.grad is not None and moe.shared.gate.weight.grad.abs().sum() > 0
    with torch.no_grad():
        moe.shared.gate.weight.fill_(0.1)
    assert not torch.allclose(moe(x), before)


@pytest.mark.parametrize("kwargs, match", [
    (dict(granularity=4, num_shared_experts=4, num_experts=4), "at most 3 of its 4 segments"),
    (dict(shared_expert_gate=True), "needs num_shared_experts >= 1"),
    (dict(granularity=4, num_shared_experts=1, num_experts=4), "not a multiple of 3"),
    (dict(num_shared_experts=-1), "num_shared_experts=-1"),
])
def test_impossible_shared_settings_are_named(kwargs, match):
    with pytest.raises(UpcycleConfigError, match=match):
        UpcycleConfig(**kwargs)


def test_native_save_load_and_from_pretrained_rebuild_shared_experts(tmp_path):
    """upcycle_fx.save/load and save_pretrained/from_pretrained (the quantizer path) rebuild the
    shared experts and their gate from the stored settings, bit for bit."""
    source = dense("llama")
    model = _rewrite(source, "G2-1-shared-gated", pattern="every_other_mlp")
    with torch.no_grad():  # a trained gate: the checkpoint must carry it
        for _, moe in upcycle_fx.moe_layers(model):
            moe.shared.gate.weight.normal_()
    upcycle_fx.save(model, tmp_path / "native")
    loaded = upcycle_fx.load(tmp_path / "native").eval()
    assert logits_error(loaded, model) == 0.0
    model.save_pretrained(tmp_path / "hf")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    assert logits_error(reloaded, model) == 0.0
    for (_, a), (_, b) in zip(upcycle_fx.moe_layers(reloaded), upcycle_fx.moe_layers(model)):
        assert a.settings == b.settings and a.shared.gate is not None


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("kind, layout", [("llama", "G2-1-shared-gated"), ("qwen2", "copy-2-shared-gated")])
def test_qwen2_moe_checkpoint_holds_the_gated_shared_experts(kind, layout, tmp_path):
    """format='hf' writes Qwen2-MoE with a real shared expert (width n·d_ff/G) and its sigmoid
    gate; stock AutoModelForCausalLM computes the upcycled model's logits to <= 1e-5, also
    after the gate was trained away from 0."""
    model = _rewrite(dense(kind), layout, pattern="all")
    with torch.no_grad():
        for _, moe in upcycle_fx.moe_layers(model):
            moe.shared.gate.weight.normal_(std=0.1)
    loaded, config = write_and_load(model, tmp_path / "hf")
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
    (_, moe), *_ = upcycle_fx.moe_layers(model)
    assert config["shared_expert_intermediate_size"] == moe.shared.d_ff > 0
    assert config["moe_intermediate_size"] == moe.experts.d_ff
    assert logits_error(loaded, model) <= 1e-5


def test_ungated_shared_experts_are_refused_by_qwen2_moe(tmp_path):
    model = _rewrite(dense("llama"), "copy-1-shared", pattern="every_other_mlp")
    with pytest.raises(HFFormatError, match="no sigmoid gate.*shared_expert_gate=True"):
        upcycle_fx.save(model, tmp_path / "hf", format="hf")
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


@pytest.mark.parametrize("target", ["mixtral", "qwen3_moe"])
def test_targets_without_shared_experts_refuse_them(target, tmp_path):
    kind = "qwen3" if target == "qwen3_moe" else "llama"
    model = _rewrite(dense(kind, **({"head_dim": 32} if kind == "qwen3" else {})), "G2-1-shared-gated")
    with pytest.raises(HFFormatError, match="shared experts, which .* lacks"):
        upcycle_fx.save(model, tmp_path / "hf", format="hf", hf_target=target)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "portable"])
def test_onnx_export_holds_shared_and_fine_grained_experts(fused, tmp_path):
    """The routed experts become the com.microsoft::MoE node (or the portable lowering), the
    gated shared experts standard operators beside it; onnxruntime matches PyTorch (<= 1e-4,
    float32 CPU), also with a trained gate."""
    import onnx

    from onnx_helpers import ONNX_TOLERANCE, Block, ort_run, ort_session, relative_error as ort_error, tokens

    model = _rewrite(build("hw-swiglu"), "G2-1-shared-gated")
    (_, moe), *_ = upcycle_fx.moe_layers(model)
    moe = copy.deepcopy(moe).eval()
    with torch.no_grad():
        moe.shared.gate.weight.normal_()
    block = Block(moe)
    d = moe.experts.d_model
    path = upcycle_fx.export_onnx(block, tmp_path / "layer.onnx", args=(tokens(2, 6, d),), fused=fused)
    assert path.report.layers[0].lowering == ("fused" if fused else "portable")
    graph = onnx.load(str(path)).graph
    assert sum(n.domain == "com.microsoft" for n in graph.node) == int(fused)
    assert any(n.op_type == "Sigmoid" for n in graph.node)
    session = ort_session(path)
    for batch, seq in [(3, 5), (1, 17)]:
        x = tokens(batch, seq, d)
        with torch.no_grad():
            assert ort_error(ort_run(session, {"x": x}), block(x)) <= ONNX_TOLERANCE


@pytest.mark.slow
def test_cli_writes_a_fine_grained_shared_expert_model_users_load_with_transformers(tmp_path):
    """`upcycle-fx rewrite DIR --granularity 2 --shared-experts 1 --shared-expert-gate --format hf`
    (options from a recipe, one overridden by a flag) writes a Qwen2-MoE that stock transformers
    loads with the dense model's logits; an impossible combination exits 2 with the named error."""
    from cli_models import llama_dir, run_cli, snapshot

    source = llama_dir(tmp_path / "llama")
    before = snapshot(source)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("experts: 4\ntop_k: 2\ngranularity: 2\nshared_experts: 1\nshared_expert_gate: true\n")
    result = run_cli("rewrite", source, "--recipe", recipe, "--pattern", "all", "--router-init-std", "1.0",
                     "--format", "hf", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr + result.stdout
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True).eval()
    dense_model = transformers.AutoModelForCausalLM.from_pretrained(source, local_files_only=True).eval()
    assert type(loaded).__name__ == "Qwen2MoeForCausalLM"
    assert loaded.config.shared_expert_intermediate_size == loaded.config.moe_intermediate_size == 32
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert relative_error(loaded(input_ids=ids).logits, dense_model(input_ids=ids).logits) <= 1e-5
    bad = run_cli("rewrite", source, "--granularity", "4", "--shared-experts", "4", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "at most 3 of its 4 segments" in " ".join((bad.stderr + bad.stdout).split())
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()
    assert snapshot(source) == before


@pytest.mark.parametrize("granularity, num_experts, top_k", [(1, 4, 2), (4, 6, 3)])
def test_a_biased_ffn_with_shared_experts_adds_its_down_bias_once(granularity, num_experts, top_k):
    """Routed experts carry the whole down bias (their weights sum to 1); the shared ones must not
    add it again."""
    from upcycle_fx.report import relative_error

    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    with torch.no_grad():
        dense[2].bias.normal_(0, 5.0)  # a bias large enough that counting it twice shows
    model = torch.nn.Sequential(dense).eval()
    x = torch.randn(4, 16)
    result = upcycle_fx.upcycle(model, upcycle_fx.UpcycleConfig(
        pattern="all", num_experts=num_experts, top_k=top_k, granularity=granularity, num_shared_experts=1,
        shared_expert_gate=True, seed=0), example_inputs=(x,))
    with torch.no_grad():
        assert relative_error(result.model(x), model(x)) <= 1e-5


@pytest.fixture(scope="module")
def recipe_ranks(tmp_path_factory):
    from distributed_cases import RECIPE_CASES
    from test_distributed import torchrun

    out = tmp_path_factory.mktemp("recipe_ranks")
    torchrun(2, out, "--cases", ",".join(RECIPE_CASES))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fsdp_granular_shared", "ep_granular_shared"])
def test_fine_grained_and_shared_experts_train_on_two_ranks_like_one_process(recipe_ranks, name):
    """FSDP2 and expert parallelism (2 gloo ranks) with fine-grained routed experts beside a gated
    shared expert: the same losses, loads, gradients and parameters after 3 steps as one process
    on the global batch (float32, 1e-5)."""
    from test_distributed import assert_matches_single_process, load, reference

    assert_matches_single_process(load(recipe_ranks, name), reference(name, 2))
