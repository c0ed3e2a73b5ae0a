"""Experts from several checkpoints (`upcycle_fx.merge_experts`): each expert is one fine-tune's
FFN, the rest is the base's or the fine-tunes' mean, the routers random or set from prompts."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import upcycle_fx
from upcycle_fx import ExpertSourceError, UpcycleConfigError, merge_experts, moe_layers
from upcycle_fx.report import first_tensor, relative_error
from tests.helpers import FUNCTION_TOLERANCE, build

ARCHITECTURES = ["llama", "gpt2"]


def fine_tune(base: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """A stand-in for a fine-tune: every weight of `base` moved by its own noise."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * (p.std() if p.numel() > 1 else 1))
    return tuned


def ids(low: int, high: int, seed: int, length: int = 8) -> torch.Tensor:
    return torch.randint(low, high, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_each_expert_is_its_sources_ffn(name):
    base = build(name).eval()
    sources = [fine_tune(base, seed) for seed in range(3)]
    merged = merge_experts(base, sources, seed=0).eval()
    layers = moe_layers(merged)
    assert layers and all(moe.num_experts == 3 for _, moe in layers)
    x = torch.randn(5, layers[0][1].experts.d_model, generator=torch.Generator().manual_seed(1))
    for _, moe in layers:
        for e, source in enumerate(sources):
            with torch.no_grad():
                want = first_tensor(source.get_submodule(moe.source)(x))
                got = moe.experts.forward_expert(e, x)
            assert relative_error(got, want) <= FUNCTION_TOLERANCE, (moe.source, e)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_rest_comes_from_the_base_or_is_the_sources_mean(name):
    base = build(name).eval()
    sources = [fine_tune(base, seed) for seed in range(2)]
    moe_paths = None
    for rest in ("base", "average"):
        merged = merge_experts(base, sources, rest=rest, seed=0)
        moe_paths = [path for path, _ in moe_layers(merged)]
        checked = 0
        for param_name, p in merged.named_parameters():
            if any(param_name.startswith(path + ".") for path in moe_paths):
                continue
            if rest == "base":
                want = base.get_parameter(param_name)
            else:
                want = torch.stack([s.get_parameter(param_name) for s in sources]).mean(0)
            torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7, msg=param_name)
            checked += 1
        assert checked > 5


def test_identical_sources_give_the_base_function_back():
    base = build("llama").eval()
    merged = merge_experts(base, [copy.deepcopy(base) for _ in range(4)], rest="average", seed=0).eval()
    inputs = {"input_ids": ids(4, 200, 0, 12)}
    with torch.no_grad():
        error = relative_error(first_tensor(merged(**inputs)), first_tensor(base(**inputs)))
    assert error <= FUNCTION_TOLERANCE


def test_base_and_sources_are_left_untouched():
    base = build("llama").eval()
    sources = [fine_tune(base, seed) for seed in range(2)]
    before = [copy.deepcopy(m.state_dict()) for m in (base, *sources)]
    merge_experts(base, sources, rest="average", router_init="hidden",
                  prompts=[[ids(4, 50, 0)], [ids(150, 200, 1)]], seed=0)
    for model, state in zip((base, *sources), before):
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key


def test_hidden_router_rows_are_the_unit_mean_inputs_and_prefer_their_own_prompts():
    base = build("llama").eval()
    sources = [fine_tune(base, seed) for seed in range(3)]
    prompts = [[ids(4 + 60 * e, 60 + 60 * e, seed) for seed in range(2)] for e in range(3)]
    merged = merge_experts(base, sources, router_init="hidden", prompts=prompts, seed=0).eval()
    for _, moe in moe_layers(merged):
        means = []
        for group in prompts:
            seen = []
            handle = moe.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
            with torch.no_grad():
                for prompt in group:
                    merged(input_ids=prompt)
            handle.remove()
            means.append(torch.cat(seen).float().mean(0))
        rows = torch.stack(means)
        rows = rows / rows.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(moe.router.weight.float(), rows, rtol=1e-5, atol=1e-6)
        # Mean router logit over expert e's prompt tokens is highest for expert e (Cauchy-Schwarz).
        logits = torch.stack([moe.router(m[None])[0] for m in means])
        assert torch.equal(logits.argmax(-1), torch.arange(3))


def test_negative_prompts_are_subtracted():
    base = build("llama").eval()
    sources = [fine_tune(base, seed) for seed in range(2)]
    prompts = [[ids(4, 50, 0)], [ids(150, 200, 1)]]
    plain = merge_experts(base, sources, router_init="hidden", prompts=prompts, seed=0)
    negative = merge_experts(base, sources, router_init="hidden", prompts=prompts,
                             negative_prompts=[[ids(150, 200, 1)], []], seed=0)
    first = lambda m: moe_layers(m)[0][1].router.weight  # noqa: E731
    assert not torch.allclose(first(plain)[0], first(negative)[0])
    torch.testing.assert_close(first(plain)[1], first(negative)[1])


def test_merged_model_round_trips_through_save_pretrained(tmp_path):
    base = build("llama").eval()
    merged = merge_experts(base, [fine_tune(base, seed) for seed in range(2)], seed=0).eval()
    merged.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    for (name, p), (_, q) in zip(merged.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    inputs = {"input_ids": ids(4, 200, 3, 10)}
    with torch.no_grad():
        assert torch.equal(first_tensor(loaded(**inputs)), first_tensor(merged(**inputs)))


def test_merged_model_trains_with_the_aux_loss():
    base = build("llama").train()
    merged = merge_experts(base, [fine_tune(base, seed) for seed in range(2)], seed=0).train()
    out = merged(input_ids=ids(4, 200, 0, 12), labels=ids(4, 200, 0, 12))
    out.loss.backward()
    router = moe_layers(merged)[0][1].router.weight
    assert router.grad is not None and bool(router.grad.abs().sum() > 0)


@pytest.mark.parametrize("make_sources, message", [
    (lambda base: [], "non-empty list"),
    (lambda base: [build("gpt2")], "GPT2LMHeadModel"),
    (lambda base: ["not a model"], "not a torch.nn.Module"),
])
def test_sources_that_are_not_fine_tunes_are_refused(make_sources, message):
    base = build("llama")
    with pytest.raises(UpcycleConfigError, match=message):
        merge_experts(base, make_sources(base))


def test_a_source_with_other_shapes_is_refused_before_any_work(monkeypatch):
    import upcycle_fx.merge as merge

    base = build("llama")
    other = fine_tune(base, 0)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.zeros(3, 3))
    monkeypatch.setattr(merge, "upcycle", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ExpertSourceError, match="model.layers.0.mlp.up_proj.weight"):
        merge_experts(base, [base, other])


@pytest.mark.parametrize("kwargs, message", [
    ({"rest": "mean"}, "rest="),
    ({"router_init": "cheap"}, "router_init="),
    ({"router_init": "hidden"}, "prompts="),
    ({"router_init": "hidden", "prompts": [[torch.ones(1, 4, dtype=torch.long)]]}, "list of 2 lists"),
    ({"router_init": "hidden", "prompts": [[], []]}, "non-empty"),
    ({"prompts": [[1], [2]]}, "only with router_init='hidden'"),
    ({"num_experts": 8}, "one expert per source"),
    ({"expert_init": "random"}, "neither re-initialised"),
    ({"expert_noise_std": 0.1}, "neither re-initialised"),
    ({"top_k": 3}, "top_k=3 exceeds"),
    ({"no_such_option": 1}, "UpcycleConfig's fields"),
])
def test_bad_options_are_named_errors(kwargs, message):
    base = build("llama")
    with pytest.raises(UpcycleConfigError, match=message):
        merge_experts(base, [base, base], **kwargs)


def test_the_function_is_public():
    assert upcycle_fx.merge_experts is merge_experts
