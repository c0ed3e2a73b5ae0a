"""A decision for every FFN candidate: selected, not selected (and why), or rejected (and why),
from `find_mlps`, in the `NoMLPFoundError` message, and in `upcycle-fx inspect`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn

import upcycle_fx
from upcycle_fx.errors import NoMLPFoundError, RewriteError, UpcycleConfigError

from cli_models import run_cli

D, FF = 16, 32
INPUTS = torch.randn(2, 5, D)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()

    def forward(self, x):
        return x + self.mlp(x)


class TiedReadout(nn.Module):
    """Two blocks; the head reads block 1's up-projection weight (a tie written in code)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x @ self.blocks[1].mlp.fc1.weight.T


class LeakyFFN(nn.Module):
    """Two blocks and a third FFN-shaped pair whose hidden value is also returned (not an FFN)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.probe_in, self.probe_out = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        hidden = F.relu(self.probe_in(x))
        return self.probe_out(hidden), hidden.mean()


class TanhOnly(nn.Module):
    """Linear -> tanh -> Linear: shaped like an FFN, but tanh is a pooler's activation."""

    def __init__(self) -> None:
        super().__init__()
        self.proj_in, self.proj_out = nn.Linear(D, FF), nn.Linear(FF, D)

    def forward(self, x):
        return self.proj_out(torch.tanh(self.proj_in(x)))


def by_status(found, status):
    return [d for d in found.decisions if d.status == status]


def test_every_found_ffn_has_a_decision_with_the_patterns_reason():
    """every_other_mlp: odd blocks selected, even blocks not, each saying so."""
    found = upcycle_fx.find_mlps(nn.Sequential(Block(), Block(), Block()), INPUTS)
    assert [(d.index, d.status) for d in found.decisions] == [
        (0, "not selected"), (1, "selected"), (2, "not selected")]
    assert "takes odd blocks" in found.decisions[0].reason and "block 0" in found.decisions[0].reason
    assert [d.where for d in found.decisions] == ["0.mlp", "1.mlp", "2.mlp"]
    assert "#1 1.mlp: dense gelu: selected" in found.explain()


@pytest.mark.parametrize("pattern, selected, why", [
    ("all", [0, 1, 2], "pattern all takes every FFN"),
    ([2], [2], "pattern [2] does not list FFN #1"),
    (lambda m: m.block == 0, [0], "returned False"),
])
def test_other_patterns_explain_their_choice(pattern, selected, why):
    found = upcycle_fx.find_mlps(nn.Sequential(Block(), Block(), Block()), INPUTS, pattern=pattern)
    assert [d.index for d in by_status(found, "selected")] == selected
    assert why in found.decisions[1].reason


def test_ffn_whose_weight_is_used_elsewhere_is_rejected_with_the_reason():
    """The rewrite cannot replace an FFN whose weight another part of the model reads: the
    decision says so (and whether the pattern would make the rewrite stop on it)."""
    model = TiedReadout()
    found = upcycle_fx.find_mlps(model, INPUTS, pattern="all")
    assert [(d.index, d.status) for d in found.decisions] == [(0, "selected"), (1, "rejected")]
    reason = found.decisions[1].reason
    assert "blocks.1.mlp.fc1.weight is read outside the FFN" in reason
    assert "rewrite would stop with RewriteError" in reason
    with pytest.raises(RewriteError, match="read outside the FFN"):  # the decision told the truth
        upcycle_fx.rewrite(model, pattern="all", num_experts=2, example_inputs=INPUTS)
    left = upcycle_fx.find_mlps(model, INPUTS, pattern=[0]).decisions[1]
    assert left.status == "rejected" and "leaves it dense anyway" in left.reason
    upcycle_fx.rewrite(model, pattern=[0], num_experts=2, example_inputs=INPUTS)  # the other converts


def test_candidate_a_pattern_refuses_is_rejected_with_its_modules_and_reason():
    """A Linear -> relu -> Linear whose hidden value is used elsewhere is no FFN: one rejected row
    naming both modules; the two real FFNs are decided as usual."""
    found = upcycle_fx.find_mlps(LeakyFFN(), INPUTS)
    assert len(found) == 2
    (rejected,) = by_status(found, "rejected")
    assert rejected.where == "probe_in, probe_out" and rejected.index is None
    assert rejected.kind == "dense" and rejected.activation == "relu"
    assert "also used outside the FFN" in rejected.reason
    assert "- probe_in, probe_out: dense relu: rejected" in found.explain()


def test_placements_inside_a_found_ffn_are_not_reported_as_rejected():
    """Partial placements of a found FFN (e.g. the dense pattern inside a gated Llama MLP) are
    part of that FFN, not separate candidates."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    found = upcycle_fx.find_mlps(transformers.LlamaForCausalLM(config).eval())
    assert [d.status for d in found.decisions] == ["not selected", "selected"]


def test_no_ffn_found_lists_the_near_misses_with_modules_and_reasons():
    model = TanhOnly()
    found = upcycle_fx.find_mlps(model, INPUTS)
    assert len(found) == 0 and [d.status for d in found.decisions] == ["rejected"]
    with pytest.raises(NoMLPFoundError) as error:
        upcycle_fx.rewrite(model, example_inputs=INPUTS)
    message = str(error.value)
    assert "1 candidate(s) rejected" in message
    assert "dense candidate proj_in, proj_out (tanh): activation 'tanh' is not an FFN activation" in message


def test_find_mlps_checks_the_pattern_before_capturing():
    with pytest.raises(UpcycleConfigError, match="pattern='odd' is unknown"):
        upcycle_fx.find_mlps(nn.Sequential(Block(), Block()), INPUTS, pattern="odd")
    with pytest.raises(UpcycleConfigError, match="out of range"):
        upcycle_fx.find_mlps(nn.Sequential(Block(), Block()), INPUTS, pattern=[5])


def test_inspect_prints_a_row_per_candidate(tmp_path):
    """`upcycle-fx inspect DIR` on a saved BERT classifier whose pooler + classifier look like an
    FFN: the two FFNs (convert no / yes) and the rejected pair with its reason, exit 0."""
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=128, num_labels=64)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path)
    result = run_cli("inspect", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("│")[2].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in result.stdout.splitlines() if line.count("│") > 8}
    assert rows["bert.encoder.layer.0"][6:8] == ["no", "even block"]
    assert rows["bert.encoder.layer.1"][6:8] == ["yes", "odd block"]
    assert rows["bert.pooler.dense, classifier"][6] == "rejected"
    assert ("rejected bert.pooler.dense, classifier: not an FFN the dense pattern accepts: activation "
            "'tanh' is not an FFN activation") in result.stdout
    assert "pattern every_other_mlp takes odd blocks" in result.stdout
