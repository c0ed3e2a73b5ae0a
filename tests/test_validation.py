"""Every argument of the public API is checked before any work: a bad value is an
UpcycleConfigError naming the argument, raised before the model is traced or copied."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import upcycle_fx
from upcycle_fx import CaptureError, UpcycleConfigError
from upcycle_fx.capture import regions, tracer

from helpers import build

BAD_VALUES = {
    "pattern": ["every_third_mlp", "", "ALL", [1, 1], [0, 2, 0], [-1], [1.0], [True], ["1"], [],
                {1: 2}, {1, 3}, 3, 1.5, None, b"all"],
    "num_experts": [0, -1, 2**40, 4097, 8.0, "8", True, None, math.nan],
    "top_k": [0, -1, "2", 2.0, True, None, 9],
    "routing": ["switch", "TOP_K", None, 1, ["top_k"]],
    "capacity_factor": [0, -1.0, math.inf, math.nan, "1.25", True, [1.25]],
    "normalize_weights": [None, 1, 0, "True", "False", "no", 1.0],
    "router_init_std": [math.nan, math.inf, -math.inf, -0.1, "0.02", None, True, [0.02]],
    "expert_noise_std": [math.nan, math.inf, -1e-3, "0", None, False],
    "expert_init": ["zeros", None, 1, "COPY"],
    "aux_loss_weight": [math.nan, math.inf, -0.01, "0.01", None, True],
    "z_loss_weight": [math.nan, -math.inf, -1.0, "0", None, True],
    "scoring": ["tanh", "Sigmoid", None, 1, ["softmax"]],
    "balancing": ["aux_loss", None, 0, ["bias"]],
    "bias_update_speed": [math.nan, math.inf, -1e-3, "0.001", None, True],
    "balance_scope": ["global", None, 1, ["global_batch"]],
    "routed_scaling_factor": [0.0, -1.0, math.nan, math.inf, "1", None, True],
    "weight_scaling": [True, "yes", None, 1],
    "example_inputs": ["some text", 3, object(), (), {}, [None], ("a", 1)],
    "inplace": ["no", "False", 1, 0, None, 1.0],
    "seed": ["abc", -1, 1.5, True, 2**64, math.nan],
    "leaf_modules": ["Linear", nn.Linear, [3], [object], 5, None, [nn.Linear(2, 2)]],
    "verify": ["yes", 1, None],
    "drop_ratio": [math.nan, -0.1, 1.5, "0.5", True, 0.5],   # 0.5: only with expert_init="drop"
    "granularity": [0, -1, 2.0, "2", True, None, 3],          # 3: 8 experts are not 3 segments' copies
    "num_shared_experts": [-1, 1.0, "1", True, None, 4097],
    "shared_expert_gate": [1, "yes", None, True],             # True: no shared expert to gate
}
CASES = [(name, value) for name, values in BAD_VALUES.items() for value in values]


@pytest.fixture
def no_tracing(monkeypatch):
    """Fail the test if the model is captured, run or copied."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was traced or run before the arguments were checked")

    monkeypatch.setattr(tracer.CaptureTracer, "trace", forbidden)
    monkeypatch.setattr(regions, "record_module_inputs", forbidden)
    monkeypatch.setattr(upcycle_fx.api.copy, "deepcopy", forbidden)


def test_every_argument_has_bad_values():
    """The table covers every keyword argument of rewrite (a new argument needs new rows)."""
    import inspect

    names = set(inspect.signature(upcycle_fx.rewrite).parameters) - {"model"}
    assert names == set(BAD_VALUES)


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v!r}"[:40] for n, v in CASES])
def test_bad_value_is_a_named_error_before_tracing(name, value, no_tracing):
    model = build("hw-swiglu")
    with pytest.raises(UpcycleConfigError) as info:
        upcycle_fx.rewrite(model, **{name: value})
    assert name in str(info.value)


@pytest.mark.parametrize("model", [None, "llama", torch.randn(3), nn.Linear])
@pytest.mark.parametrize("function", ["rewrite", "upcycle", "find_mlps", "aux_loss", "moe_layers"])
def test_model_must_be_a_module(function, model, no_tracing):
    with pytest.raises(UpcycleConfigError, match=rf"{function}\(model=\.\.\.\) takes a torch.nn.Module"):
        getattr(upcycle_fx, function)(model)


@pytest.mark.parametrize("config", [{"num_experts": 4}, "every_other_mlp", 8])
def test_upcycle_takes_an_upcycle_config(config, no_tracing):
    with pytest.raises(UpcycleConfigError, match="must be an upcycle_fx.UpcycleConfig"):
        upcycle_fx.upcycle(build("hw-swiglu"), config)


@pytest.mark.parametrize("kwargs", [dict(example_inputs="text"), dict(leaf_modules="Linear")])
def test_find_mlps_checks_its_arguments_first(kwargs, no_tracing):
    with pytest.raises(UpcycleConfigError, match=next(iter(kwargs))):
        upcycle_fx.find_mlps(build("hw-swiglu"), **kwargs)


def test_good_values_still_work():
    """Integral types other than int (numpy), tuples and ranges as patterns are accepted."""
    np = pytest.importorskip("numpy")
    config = upcycle_fx.UpcycleConfig(pattern=range(1, 4, 2), num_experts=np.int64(4), top_k=1,
                                      capacity_factor=1, router_init_std=0, seed=np.int32(3))
    assert config.num_experts == 4
    upcycle_fx.UpcycleConfig(pattern=(0, 2), routing="expert_choice", top_k=16, num_experts=4)


def test_a_raising_pattern_callable_names_the_ffn_and_the_callable():
    def picky(match):
        raise KeyError("no such field")

    with pytest.raises(UpcycleConfigError, match=r"pattern=.*picky raised KeyError.*on FFN #0 blocks\[0\]"):
        upcycle_fx.rewrite(build("hw-swiglu"), picky)


def test_out_of_range_indices_name_the_valid_range():
    with pytest.raises(UpcycleConfigError, match=r"\[4\] are out of range: the model has 4 FFNs \(0\.\.3\)"):
        upcycle_fx.rewrite(build("hw-swiglu"), [1, 4])


class _Block(nn.Module):
    """An MLP after a data-dependent branch: needs example inputs to be captured."""

    def __init__(self, d=8):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)

    def forward(self, x):
        if x.abs().max() > 1e6:
            x = x.clamp(-1e6, 1e6)
        return x + self.down(self.act(self.up(x)))


@pytest.mark.parametrize("model, inputs, where", [
    (lambda: nn.Sequential(_Block(), _Block()), torch.randn(2, 5, 7), r"Sequential: .* fails in 0\.up \(Linear\).*shape"),
    (lambda: build("hw-swiglu"), torch.randn(2, 5, 7), r"SwiGLUModel: .* fails in embed \(Embedding\).*Long"),
    (lambda: build("hw-swiglu"), torch.randint(0, 1000, (2, 5)), r"SwiGLUModel: .* fails in embed \(Embedding\).*index"),
    (lambda: build("llama"), {"input_ids": torch.randn(2, 3)}, r"LlamaForCausalLM: .* fails in model\.embed_tokens"),
], ids=["regions", "traceable-float-ids", "traceable-ids-out-of-range", "hf"])
def test_example_inputs_the_model_cannot_take_name_the_failing_module(model, inputs, where):
    """Whether the model traces whole or by region: a CaptureError naming the innermost module
    that failed, and what to pass instead (a traceable model used to trace on without its
    example values and fail later with the model's own exception)."""
    with pytest.raises(CaptureError, match=r"the forward on example_inputs fails in") as info:
        upcycle_fx.rewrite(model(), "all", example_inputs=inputs)
    assert re.search(where, str(info.value)) and "Pass inputs of the shape, dtype and device" in str(info.value)


def test_too_many_experts_for_the_memory_is_refused_before_allocating(monkeypatch):
    """A config within bounds whose experts cannot fit the device's memory: named, before copying."""
    monkeypatch.setattr(upcycle_fx.api.os, "sysconf", lambda name: 1024 if name == "SC_PHYS_PAGES" else 4096)
    with pytest.raises(UpcycleConfigError, match=r"num_experts=4096 over 2 FFNs needs about .* GiB"):
        upcycle_fx.rewrite(build("hw-swiglu"), num_experts=4096)


def test_tokenizer_output_is_accepted_as_keyword_arguments():
    """A BatchEncoding is a Mapping, not a dict: it must give keyword arguments, not one positional."""
    transformers = pytest.importorskip("transformers")
    model = build("hw-swiglu")
    batch = transformers.BatchEncoding({"input_ids": torch.randint(0, 100, (2, 6))})
    result = upcycle_fx.upcycle(model, example_inputs=batch)
    assert result.verified_error is not None and result.verified_error <= 1e-5


def test_layer_settings_default_like_the_config():
    """MoESettings repeats UpcycleConfig's per-layer fields: the same names must have the same
    defaults, so a layer rebuilt from a saved manifest routes as the config said."""
    from dataclasses import fields

    from upcycle_fx import UpcycleConfig
    from upcycle_fx.moe import MoESettings

    config = UpcycleConfig()
    names = {f.name for f in fields(UpcycleConfig)}
    for f in fields(MoESettings):
        assert f.name in names, f.name
        assert f.default == getattr(config, f.name), f.name
