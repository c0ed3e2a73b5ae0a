"""A new FFN family is one file: its pattern, the labels of its own nodes, and how its weights
become the experts' stacked weights. Nothing else in upcycle_fx knows about it.

The family below (`MatmulGLU`) is a gated FFN written with raw parameter matmuls,
`(act(x @ W_gate) * (x @ W_up)) @ W_down`, weights stored [in, out]: no built-in family
matches it (a matmul with a parameter is no projection to them).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import upcycle_fx
from upcycle_fx.moe.experts import FFNWeights
from upcycle_fx.patterns import PATTERNS, FFNPattern, FFNSite, MatchResult, register_pattern
from upcycle_fx.patterns.base import ANY, projection
from upcycle_fx.patterns.vocabulary import NodeMeaning, Projection

# --------------------------------------------------------------------------- the family (one file)

MATMUL = "matmul"


@dataclass(frozen=True)
class MatmulProjection(Projection):
    """`x @ W` with W an [in, out] parameter: the nn.Linear weight is W.T."""

    def tensors(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return getattr(model.get_submodule(self.owner), self.weight).t(), None


class MatmulGLU(FFNPattern):
    """Replaces `(act(x @ W_gate) * (x @ W_up)) @ W_down`."""

    kind = "matmul_glu"
    roles = {"x": ANY, "gate": MATMUL, "up": MATMUL, "act": "act", "mul": "mul", "down": MATMUL}
    edges = (("x", "gate"), ("x", "up"), ("gate", "act"), ("act", "mul"), ("up", "mul"), ("mul", "down"))
    before_activation = (("gate", "act"), ("up", "mul"))
    after_activation = (("act", "mul"), ("mul", "down"))

    def label_node(self, node: fx.Node, region) -> NodeMeaning | None:
        if node.op != "call_function" or node.target not in (operator.matmul, torch.matmul):
            return None
        weight = node.args[1]
        if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
            return None
        owner, _, name = weight.target.rpartition(".")
        tensor = getattr(region.module(owner), name)
        if tensor.dim() != 2:
            return None
        return NodeMeaning(MATMUL, MatmulProjection(node, region.absolute(owner), name, None, MATMUL,
                                                    int(tensor.shape[0]), int(tensor.shape[1])))

    def assemble(self, view, roles) -> MatchResult:
        gate, up, down = (projection(view, roles[r]) for r in ("gate", "up", "down"))
        if {(gate.in_features, gate.out_features), (up.in_features, up.out_features)} != {
                (down.out_features, down.in_features)}:
            return MatchResult.fail("gate/up shapes do not match down", gate.node, down.node)
        return self.site(view, roles, up=up, down=down, gate=gate)

    def dense_weights(self, site: FFNSite, model: nn.Module) -> FFNWeights:
        gate, up, down = (p.tensors(model)[0] for p in (site.gate, site.up, site.down))
        return FFNWeights(torch.cat([gate, up]), None, down, None, gated=True)


# --------------------------------------------------------------------------- a model using it


class _MatmulGLUBlock(nn.Module):
    def __init__(self, d: int = 16, f: int = 40):
        super().__init__()
        self.ffn = _MatmulGLUFFN(d, f)

    def forward(self, x):
        return x + self.ffn(x)


class _MatmulGLUFFN(nn.Module):
    def __init__(self, d: int, f: int):
        super().__init__()
        self.w_gate, self.w_up = nn.Parameter(torch.randn(d, f) / d**0.5), nn.Parameter(torch.randn(d, f) / d**0.5)
        self.w_down = nn.Parameter(torch.randn(f, d) / f**0.5)

    def forward(self, x):
        return (F.silu(x @ self.w_gate) * (x @ self.w_up)) @ self.w_down


@pytest.fixture
def registered():
    """The family registered as its file would (`@register_pattern`), for this test only."""
    before = list(PATTERNS)
    register_pattern(MatmulGLU)
    yield
    PATTERNS[:] = before


def _model():
    torch.manual_seed(0)
    return nn.Sequential(_MatmulGLUBlock(), _MatmulGLUBlock()).eval()


def test_the_built_in_families_do_not_match_the_toy_ffn():
    found = upcycle_fx.find_mlps(_model(), example_inputs=(torch.randn(2, 3, 16),))
    assert list(found) == []


def test_a_family_in_one_file_converts_a_model_exactly(registered):
    model = _model()
    x = torch.randn(2, 5, 16)
    found = upcycle_fx.find_mlps(model, example_inputs=(x,))
    assert [(m.kind, m.activation, m.d_model, m.d_ff, m.paths) for m in found] == [
        ("matmul_glu", "silu", 16, 40, (f"{i}.ffn",) * 3) for i in range(2)]
    config = upcycle_fx.UpcycleConfig(pattern="all", num_experts=4, top_k=2, seed=0)
    result = upcycle_fx.upcycle(model, config, example_inputs=(x,))
    sparse = result.model
    assert [name for name, _ in upcycle_fx.moe_layers(sparse)] == ["0.ffn", "1.ffn"]
    experts = sparse[0].ffn.experts
    torch.testing.assert_close(experts.up_proj[3], torch.cat([model[0].ffn.w_gate.t(), model[0].ffn.w_up.t()]),
                               rtol=0, atol=0)
    with torch.no_grad():
        error = float((sparse(x) - model(x)).abs().max() / model(x).abs().max())
    assert error < 1e-5
    assert result.verified_error is not None and result.verified_error < 1e-5


def test_nothing_outside_the_pattern_files_branches_on_a_family():
    """The rewrite reads weights through the site's family, never by its kind."""
    import inspect

    from upcycle_fx.passes import splice, upcycle

    for module in (upcycle, splice):
        source = inspect.getsource(module)
        assert ".kind ==" not in source and '"fused_gated"' not in source and '"gated"' not in source
