"""find_mlps: every FFN and nothing else, with kind, activation, sizes, paths and block."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from torch import nn

import upcycle_fx
from upcycle_fx.patterns import PATTERNS
from upcycle_fx.testing.zoo import ZOO

from helpers import ZOO_NAMES, build


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_finds_exactly_the_expected_ffns(name):
    """The finder's report equals the zoo's hand-checked list, in execution order."""
    found = upcycle_fx.find_mlps(build(name))
    got = [(m.paths, m.kind, m.activation, m.d_model, m.d_ff) for m in found]
    expected = [(e.paths, e.kind, e.activation, e.d_model, e.d_ff) for e in ZOO[name].expected]
    assert got == expected
    assert [m.index for m in found] == list(range(len(found)))


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_ffn_sits_in_a_stack_of_blocks(name):
    """Each zoo FFN is located in a repeated-block stack; blocks count 0..n-1 per stack."""
    found = upcycle_fx.find_mlps(build(name))
    stacks: dict[str, list[int]] = {}
    for m in found:
        assert m.stack is not None, m
        stacks.setdefault(m.stack, []).append(m.block)
    for blocks in stacks.values():
        assert blocks == list(range(len(blocks)))


def test_t5_counts_encoder_and_decoder_stacks_separately():
    """T5's FFNs live in encoder.block and decoder.block, each numbered from 0."""
    found = upcycle_fx.find_mlps(build("t5"))
    assert [(m.stack, m.block) for m in found] == (
        [("encoder.block", i) for i in range(4)] + [("decoder.block", i) for i in range(4)])


def test_pooler_and_classifier_are_rejected_with_a_reason():
    """BERT's pooler (Linear -> tanh) feeding the classifier is a near miss, not an FFN, even
    when the classifier has as many labels as the hidden size (so shapes alone cannot tell)."""
    import transformers

    for num_labels, reason in ((3, "do not map d_model back"), (64, "'tanh' is not an FFN activation")):
        config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=160,
                                         num_labels=num_labels)
        found = upcycle_fx.find_mlps(transformers.BertForSequenceClassification(config).eval())
        assert len(found) == 2
        assert all("pooler" not in p and "classifier" not in p for m in found for p in m.paths)
        reasons = [miss.reason for miss in found.near_misses]
        assert any(reason in r for r in reasons), reasons


def test_styles_are_reported():
    """Projection style: Conv1D for GPT-2, functional for raw F.linear, linear otherwise."""
    assert {m.style for m in upcycle_fx.find_mlps(build("gpt2"))} == {"conv1d"}
    assert {m.style for m in upcycle_fx.find_mlps(build("hw-functional"))} == {"functional"}
    assert {m.style for m in upcycle_fx.find_mlps(build("llama"))} == {"linear"}
    assert not any(m.bias for m in upcycle_fx.find_mlps(build("hw-bias-free")))


def test_real_checkpoint_minilm():
    """all-MiniLM-L6-v2: six dense GELU FFNs 384 -> 1536 -> 384 split over two modules."""
    from upcycle_fx.testing.zoo import load_minilm

    model, _ = load_minilm()
    found = upcycle_fx.find_mlps(model)
    assert [(m.kind, m.activation, m.d_model, m.d_ff) for m in found] == [("dense", "gelu", 384, 1536)] * 6
    assert found[2].paths == ("encoder.layer.2.intermediate.dense", "encoder.layer.2.output.dense")


def test_patterns_are_declarative_networkx_graphs():
    """One registered pattern per family, each a small labelled nx.DiGraph, most specific first."""
    assert [p.kind for p in PATTERNS] == ["fused_gated", "gated", "dense", "pointwise_conv", "dense_hidden_norm",
                                          "gated_hidden_norm", "mixing_conv"]
    for pattern in PATTERNS:
        graph = pattern.pattern_graph()
        assert isinstance(graph, nx.DiGraph) and nx.is_weakly_connected(graph)
        assert set(nx.get_node_attributes(graph, "label")) == set(pattern.roles)


def test_register_activation_names_an_unknown_activation():
    """An unknown element-wise activation module is found under its class name; registering it
    gives it a record's name (and with it the fast paths, once the probe vouches for it)."""

    class Wiggle(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.act, self.down = nn.Linear(8, 16), Wiggle(), nn.Linear(16, 8)

        def forward(self, x):
            return x + self.down(self.act(self.up(x)))

    model = nn.Sequential(Block(), Block())
    assert [m.activation for m in upcycle_fx.find_mlps(model)] == ["Wiggle", "Wiggle"]  # by behaviour
    upcycle_fx.register_activation(Wiggle, "silu")
    try:
        found = upcycle_fx.find_mlps(model)
        assert [(m.activation, m.stack, m.block) for m in found] == [("silu", "", 0), ("silu", "", 1)]
    finally:
        from upcycle_fx.patterns import vocabulary

        vocabulary._registered_activations.pop(Wiggle)


def test_find_mlps_does_not_touch_the_model():
    """A dry run leaves parameters, hooks and outputs as they were."""
    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = ZOO["llama"].inputs(2, 8)
    with torch.no_grad():
        out_before = model(**inputs).logits
    upcycle_fx.find_mlps(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, out_before)


def test_registering_a_new_activation_name_makes_its_ffns_convert():
    """A Mish FFN is found as "mish" (its record) and, registered under a name of one's own,
    under that name; either way it converts exactly (it used to stay rejected until registered)."""
    from upcycle_fx.patterns import vocabulary

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 48), nn.Mish(), nn.Linear(48, 16)).eval()
    assert [m.activation for m in upcycle_fx.find_mlps(dense)] == ["mish"]
    upcycle_fx.register_activation(nn.Mish, "my_mish")
    try:
        found = upcycle_fx.find_mlps(dense)
        assert [m.activation for m in found] == ["my_mish"]
        x = torch.randn(6, 16)
        sparse = upcycle_fx.rewrite(dense, "all", num_experts=4, top_k=2, example_inputs=(x,))
        with torch.no_grad():
            torch.testing.assert_close(sparse(x * 2), dense(x * 2), rtol=1e-5, atol=1e-6)
    finally:
        vocabulary._registered_activations.pop(nn.Mish)


@pytest.mark.parametrize("args", [(lambda x: x, "mish"), (nn.Mish, ""), (nn.Mish, "not a name")])
def test_register_activation_rejects_bad_arguments(args):
    with pytest.raises(upcycle_fx.UpcycleConfigError):
        upcycle_fx.register_activation(*args)
