"""Checks on the test model zoo (upcycle_fx.testing.zoo), the oracle for the FFN finder.

For every zoo model: it builds deterministically, runs at two input sizes, and every
ExpectedFFN names real modules with the right shapes. Forward hooks then check that the
FFNs are listed in execution order and that ``kind``/``activation`` reproduce what the
model actually computes between its up and down projections.
"""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from upcycle_fx.testing import zoo
from upcycle_fx.testing.zoo import ZOO, ExpectedFFN, ZooModel

NAMES = list(ZOO)
HW_NAMES = [n for n in NAMES if n.startswith("hw-")]
SIZES = [(2, 8), (3, 5)]

# Reference activations, written independently of transformers.
ACT_REF = {
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "gelu_fast": lambda t: 0.5 * t * (1.0 + torch.tanh(t * 0.7978845608 * (1.0 + 0.044715 * t * t))),
    "gelu_quick": lambda t: t * torch.sigmoid(1.702 * t),
    "silu": F.silu,
    "relu2": lambda t: torch.relu(t) ** 2,
    "sigmoid": torch.sigmoid,
}

# Substrings / path segments that belong to attention, poolers and heads, never to an FFN.
DECOY_SUBSTRINGS = ("attn", "attention", "pooler", "classifier", "lm_head")
DECOY_SEGMENTS = ("head",)


def _require(z: ZooModel) -> None:
    """The test environment installs every zoo dependency (scripts/setup.sh): no skipping."""
    if z.requires:
        __import__(z.requires)


@functools.lru_cache(maxsize=None)
def _cached(name: str) -> torch.nn.Module:
    return ZOO[name].build()


def model_for(name: str) -> torch.nn.Module:
    """Shared built model (tests must not modify it; hooks are removed in ``finally``)."""
    _require(ZOO[name])
    return _cached(name)


def _tensors(out: object) -> Iterator[torch.Tensor]:
    """Every tensor in a model output (Tensor, ModelOutput/dict, tuple/list); skips caches."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):  # includes transformers.ModelOutput
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, (tuple, list)):
        for v in out:
            yield from _tensors(v)


def _in_out(module: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection layer from its weight."""
    w = module.weight
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: weight [in, out]
        return w.shape[0], w.shape[1]
    assert isinstance(module, torch.nn.Linear), f"{type(module).__name__} is not a projection layer"
    return w.shape[1], w.shape[0]  # nn.Linear (and FalconLinear): weight [out, in]


def _is_functional(ffn: ExpectedFFN) -> bool:
    return len(set(ffn.paths)) == 1


def _functional_params(owner: torch.nn.Module, ffn: ExpectedFFN) -> dict[str, torch.Tensor]:
    """Raw FFN parameters of an F.linear-style owner, identified by shape."""
    d, f = ffn.d_model, ffn.d_ff
    by_shape = {tuple(p.shape): p for _, p in owner.named_parameters(recurse=False)}
    want = {"w_up": (f, d), "w_down": (d, f), "b_up": (f,), "b_down": (d,)}
    found = {k: by_shape.get(s) for k, s in want.items()}
    assert found["w_up"] is not None and found["w_down"] is not None, (
        f"{ffn.paths[0]} has no [{f},{d}] and [{d},{f}] weight parameters: {sorted(by_shape)}"
    )
    return found


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


# --------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("name", NAMES)
def test_metadata(name: str) -> None:
    z = ZOO[name]
    assert z.name == name
    assert z.requires in ("", "transformers", "timm")
    n_blocks = zoo.N_LAYERS * (2 if z.encoder_decoder else 1)
    assert len(z.expected) == n_blocks, "one FFN per block (encoder + decoder for seq2seq)"
    seen: set[str] = set()
    for ffn in z.expected:
        assert ffn.kind in zoo.KINDS and ffn.activation in zoo.ACTIVATIONS
        assert len(ffn.paths) == (3 if ffn.kind == "gated" else 2)
        own = set(ffn.paths)
        assert not own & seen, f"{own & seen} listed in two FFNs"
        seen |= own
        for p in ffn.paths:
            assert not any(s in p.lower() for s in DECOY_SUBSTRINGS), p
            assert not set(p.split(".")) & set(DECOY_SEGMENTS), p


def test_zoo_import_is_lazy() -> None:
    code = (
        "import sys, upcycle_fx.testing.zoo as z; "
        "bad = [m for m in ('transformers', 'timm', 'torchvision') if m in sys.modules]; "
        "assert not bad, bad; print(len(z.ZOO))"
    )
    repo_root = pathlib.Path(zoo.__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert res.returncode == 0, res.stderr[-2000:]


# --------------------------------------------------------------------------- build and run


@pytest.mark.parametrize("name", NAMES)
def test_build_is_seeded_eval_float32(name: str) -> None:
    z = ZOO[name]
    _require(z)
    a, b = z.build(), z.build()
    assert not any(m.training for m in a.modules()), "model must be in eval mode"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if sa[k].is_floating_point():
            assert sa[k].dtype == torch.float32, k
        assert torch.equal(sa[k], sb[k]), f"{k} differs between two builds"


@pytest.mark.parametrize("name", NAMES)
def test_inputs_are_seeded(name: str) -> None:
    z = ZOO[name]
    for batch, seq in SIZES:
        x, y = z.inputs(batch, seq), z.inputs(batch, seq)
        assert x.keys() == y.keys() and x
        for k in x:
            assert torch.equal(x[k], y[k]), k
            assert x[k].shape[0] == batch


@pytest.mark.parametrize("batch,seq", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_forward(name: str, batch: int, seq: int) -> None:
    z = ZOO[name]
    model = model_for(name)
    with torch.no_grad():
        out = model(**z.inputs(batch, seq))
    tensors = list(_tensors(out))
    assert tensors, f"no tensor in output {type(out).__name__}"
    assert tensors[0].shape[0] == batch
    for t in tensors:
        if t.is_floating_point():
            assert torch.isfinite(t).all()


# --------------------------------------------------------------------------- expected FFNs


@pytest.mark.parametrize("name", NAMES)
def test_paths_and_shapes(name: str) -> None:
    z = ZOO[name]
    modules = dict(model_for(name).named_modules())
    for ffn in z.expected:
        missing = [p for p in ffn.paths if p not in modules]
        assert not missing, f"not in named_modules(): {missing}"
        d, f = ffn.d_model, ffn.d_ff
        if _is_functional(ffn):
            _functional_params(modules[ffn.paths[0]], ffn)
            continue
        layers = [modules[p] for p in ffn.paths]
        if ffn.kind == "dense":
            want = [(d, f), (f, d)]
        elif ffn.kind == "gated":
            want = [(d, f), (d, f), (f, d)]
        else:  # fused_gated
            want = [(d, 2 * f), (f, d)]
        got = [_in_out(m) for m in layers]
        assert got == want, f"{ffn.paths}: (in, out) {got} != {want}"


@pytest.mark.parametrize("name", NAMES)
def test_ffns_listed_in_execution_order(name: str) -> None:
    z = ZOO[name]
    model = model_for(name)
    modules = dict(model.named_modules())
    calls: list[int] = []
    handles = [
        modules[ffn.paths[0]].register_forward_pre_hook(lambda *_, i=i: calls.append(i))
        for i, ffn in enumerate(z.expected)
    ]
    try:
        with torch.no_grad():
            model(**z.inputs(2, 8))
    finally:
        for h in handles:
            h.remove()
    assert calls == list(range(len(z.expected)))


@pytest.mark.parametrize("name", NAMES)
def test_kind_and_activation_match_model(name: str) -> None:
    """Recompute each FFN's hidden activation from its projections and the declared kind/activation."""
    z = ZOO[name]
    model = model_for(name)
    modules = dict(model.named_modules())
    captured: dict[tuple[int, str], torch.Tensor] = {}

    def grab(key: tuple[int, str], what: str):
        def hook(mod, args, kwargs, *out):
            t = out[0] if what == "out" else _first_input(args, kwargs)
            captured.setdefault(key, t.detach().clone())

        return hook

    handles = []
    for i, ffn in enumerate(z.expected):
        first, last = modules[ffn.paths[0]], modules[ffn.paths[-1]]
        handles.append(first.register_forward_pre_hook(grab((i, "x"), "in"), with_kwargs=True))
        if _is_functional(ffn):
            handles.append(first.register_forward_hook(grab((i, "y"), "out"), with_kwargs=True))
        else:
            handles.append(last.register_forward_pre_hook(grab((i, "h"), "in"), with_kwargs=True))
    try:
        with torch.no_grad():
            model(**z.inputs(2, 8))
    finally:
        for h in handles:
            h.remove()

    with torch.no_grad():
        for i, ffn in enumerate(z.expected):
            act = ACT_REF[ffn.activation]
            x = captured[(i, "x")]
            layers = [modules[p] for p in ffn.paths]
            if _is_functional(ffn):
                p = _functional_params(layers[0], ffn)
                ref = F.linear(act(F.linear(x, p["w_up"], p["b_up"])), p["w_down"], p["b_down"])
                got = captured[(i, "y")]
            else:
                if ffn.kind == "dense":
                    ref = act(layers[0](x))
                elif ffn.kind == "gated":
                    ref = act(layers[0](x)) * layers[1](x)
                else:
                    gate, up = layers[0](x).split(ffn.d_ff, dim=-1)
                    ref = act(gate) * up
                got = captured[(i, "h")]
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{ffn.paths}: {m}")


# --------------------------------------------------------------------------- hand-written models


@pytest.mark.parametrize("name", HW_NAMES)
def test_handwritten_traces_with_plain_fx(name: str) -> None:
    z = ZOO[name]
    model = model_for(name)
    gm = torch.fx.symbolic_trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for ffn in z.expected:
        if not _is_functional(ffn):
            assert set(ffn.paths) <= targets
    for batch, seq in SIZES:
        kwargs = z.inputs(batch, seq)
        with torch.no_grad():
            torch.testing.assert_close(gm(**kwargs), model(**kwargs))


# --------------------------------------------------------------------------- real MiniLM checkpoint


@pytest.fixture(scope="module")
def minilm():
    return zoo.load_minilm()


def test_minilm_dir() -> None:
    path = zoo.minilm_dir()
    assert (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file()


def test_minilm_structure(minilm) -> None:
    model, _ = minilm
    assert not model.training
    assert model.config.hidden_size == 384
    assert model.config.intermediate_size == 1536
    assert model.config.num_hidden_layers == 6 and len(model.encoder.layer) == 6
    for layer in model.encoder.layer:
        assert tuple(layer.intermediate.dense.weight.shape) == (1536, 384)
        assert tuple(layer.output.dense.weight.shape) == (384, 1536)


def test_minilm_weights_come_from_checkpoint(minilm) -> None:
    from safetensors import safe_open

    model, _ = minilm
    params = dict(model.named_parameters())
    with safe_open(str(zoo.minilm_dir() / "model.safetensors"), "pt") as f:
        for key in ("encoder.layer.3.intermediate.dense.weight", "embeddings.word_embeddings.weight"):
            torch.testing.assert_close(params[key].detach(), f.get_tensor(key).float())


def test_minilm_embeds_sentences(minilm) -> None:
    model, tokenizer = minilm
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # sentence-transformers mean pooling
    assert emb.shape == (3, 384)
    assert torch.isfinite(emb).all()
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim
