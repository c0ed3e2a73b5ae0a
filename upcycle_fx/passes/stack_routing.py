"""Which routing each converted FFN gets: one for all, per stack, or per FFN.

`UpcycleConfig.routing` is a routing name; a mapping from stack names and/or FFN indices to
names; or a callable on an `MLPMatch` returning a name. A stack (`MLPMatch.stack`, the list of
repeated blocks: "encoder.block", "model.decoder.layers") is named by its path or any run of its
path's parts ("decoder", "model.decoder"), so `{"encoder": "expert_choice", "decoder": "top_k"}`
reads the same on T5, BART and Whisper (the sparse upcycling paper's setting). An FFN index key
wins over stack keys; an FFN no key names gets "top_k".
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import fields

from torch import nn

from ..config import ROUTINGS, UpcycleConfig
from ..errors import UpcycleConfigError
from ..moe import MoESettings
from ..report import routing_text
from .find_mlps import MLPMatch

DEFAULT_ROUTING = "top_k"
CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class NonCausalRoutingWarning(UserWarning):
    """Expert choice in a causal stack: each expert picks its tokens among the whole sequence, so
    a token's output depends on later tokens (training sees the future; generation differs)."""


def settings_for(config: UpcycleConfig, match: MLPMatch) -> MoESettings:
    """The MoE settings of the layer replacing `match`: the config's, with its own routing."""
    values = {f.name: getattr(config, f.name) for f in fields(MoESettings)}
    values["routing"] = routing_for(config, match)
    return MoESettings(**values)


def names_stack(key: str, stack: str | None) -> bool:
    """Whether the stack name `key` names `stack`: its path or a run of the path's parts."""
    if stack is None:
        return False
    parts, wanted = stack.split("."), key.split(".")
    return any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


def routing_for(config: UpcycleConfig, match: MLPMatch) -> str:
    """The routing name for one FFN (UpcycleConfigError when the config's keys disagree on it or
    the callable fails)."""
    routing = config.routing
    if isinstance(routing, str):
        return routing
    if not isinstance(routing, Mapping):
        return _called(routing, match)
    if match.index in routing:
        return routing[match.index]
    named = {key: value for key, value in routing.items()
             if isinstance(key, str) and names_stack(key, match.stack)}
    if len(set(named.values())) > 1:
        raise UpcycleConfigError(
            f"routing keys {sorted(named)} all name stack {match.stack} but ask for different routings "
            f"({named}); keep one of them, or key the FFNs by index.")
    return next(iter(named.values()), DEFAULT_ROUTING)


def _called(function, match: MLPMatch) -> str:
    name = getattr(function, "__qualname__", type(function).__name__)
    try:
        value = function(match)
    except Exception as error:  # noqa: BLE001 - the user's code: say where it failed
        raise UpcycleConfigError(
            f"routing={name} raised {type(error).__name__}: {error} on FFN {match.describe()}; the "
            "callable gets an upcycle_fx.MLPMatch and returns 'top_k' or 'expert_choice'.") from error
    if not isinstance(value, str) or value not in ROUTINGS:
        raise UpcycleConfigError(f"routing={name} returned {value!r} for FFN {match.describe()}; it must "
                                 f"return one of {ROUTINGS}.")
    return value


def check_routing(model: nn.Module, mlps: list[MLPMatch], chosen: list[MLPMatch],
                  config: UpcycleConfig) -> dict[int, str]:
    """FFN index -> routing for every chosen FFN, checked against the model before any work:
    a stack key that names no stack of the model, an index key for an FFN the pattern does not
    convert, keys that disagree, a callable that fails: UpcycleConfigError. Expert choice in a
    causal stack: NonCausalRoutingWarning."""
    routing = config.routing
    if isinstance(routing, Mapping):
        stacks = list(dict.fromkeys(m.stack for m in mlps if m.stack is not None))
        for key in routing:
            if isinstance(key, str) and not any(names_stack(key, s) for s in stacks):
                have = (f"its stacks of blocks are {', '.join(s or '<model>' for s in stacks)} (name one "
                        "by its path or a part of it, e.g. 'encoder')" if stacks
                        else "it has no stack of repeated blocks")
                raise UpcycleConfigError(
                    f"routing key {key!r} names no stack of {type(model).__name__}: {have}; or key "
                    "FFNs by index (see upcycle_fx.find_mlps).")
        indices = {m.index for m in chosen}
        unused = sorted(k for k in routing if not isinstance(k, str) and k not in indices)
        if unused:
            raise UpcycleConfigError(
                f"routing keys {unused} are FFN indices that pattern={config.pattern!r} does not convert "
                f"(it converts {sorted(indices)}); see upcycle_fx.find_mlps(model, pattern=...).")
    chosen_routing = {m.index: routing_for(config, m) for m in chosen}
    causal = [m for m in chosen if chosen_routing[m.index] == "expert_choice" and is_causal(model, m.stack)]
    if causal:
        warnings.warn(
            f"expert_choice routing in the causal stack {causal[0].stack} ({len(causal)} FFN(s)): each "
            "expert picks its tokens among the whole sequence, so a token's output depends on later "
            "tokens; use top_k there, e.g. routing={'encoder': 'expert_choice', 'decoder': 'top_k'}.",
            NonCausalRoutingWarning, stacklevel=3)
    return chosen_routing


def is_causal(model: nn.Module, stack: str | None) -> bool:
    """Whether `stack` attends causally, as far as a transformers config tells: the decoder of an
    encoder-decoder model, or any stack of a decoder-only language model. Unknown: False."""
    config = getattr(model, "config", None)
    if config is None:
        return False
    if getattr(config, "is_encoder_decoder", False):
        return stack is not None and "decoder" in stack.split(".")
    return bool(getattr(config, "is_decoder", False)) or type(model).__name__.endswith(CAUSAL_CLASS_SUFFIXES)


def routing_spec_text(routing) -> str:
    """`UpcycleConfig.routing` as the command line writes it: "top_k",
    "encoder=expert_choice,decoder=top_k", or a callable's name."""
    if isinstance(routing, str):
        return routing
    if isinstance(routing, Mapping):
        return ",".join(f"{key}={value}" for key, value in routing.items())
    return getattr(routing, "__qualname__", type(routing).__name__)


def routing_rows(config: UpcycleConfig, matches: list[MLPMatch]) -> tuple[tuple[str, str], ...]:
    """(FFN module path, its routing in words) per converted FFN, for `UpcycleReport.routing`."""
    return tuple((m.path or "<model>", routing_text(settings_for(config, m))) for m in matches)
