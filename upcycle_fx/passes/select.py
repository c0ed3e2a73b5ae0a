"""Selection pass: which of the found FFNs become MoE layers."""

from __future__ import annotations

from ..config import PatternSpec
from ..errors import NoMLPSelectedError, UpcycleConfigError
from .find_mlps import MLPMatch


def select_mlps(mlps: list[MLPMatch], pattern: PatternSpec) -> list[MLPMatch]:
    """`"every_other_mlp"`: blocks 1, 3, 5, ... of each stack (encoder and decoder counted
    apart), as in Komatsuzaki et al., and an FFN outside any stack whose weights every block
    shares (ALBERT: it serves the odd blocks too); `"all"`; a list of indices in execution
    order; or a callable `fn(MLPMatch) -> bool`."""
    if pattern == "every_other_mlp":
        chosen = [m for m in mlps if (m.block is not None and m.block % 2 == 1) or serves_every_block(m)]
    elif pattern == "all":
        chosen = list(mlps)
    elif callable(pattern):
        chosen = [m for m in mlps if _calls(pattern, m)]
    else:
        indices = list(pattern)
        bad = [i for i in indices if i >= len(mlps)]
        if bad:
            raise UpcycleConfigError(f"pattern indices {bad} are out of range: the model has "
                                     f"{len(mlps)} FFNs (0..{len(mlps) - 1}); see find_mlps(model).")
        chosen = [mlps[i] for i in sorted(set(indices))]
    if not chosen:
        found = "; ".join(m.describe() for m in mlps[:6])
        raise NoMLPSelectedError(
            f"pattern={pattern!r} selected none of the {len(mlps)} FFNs found ({found}). "
            "'every_other_mlp' takes blocks 1, 3, 5, ... of each stack of repeated blocks; "
            "use pattern='all' or a list of indices for models without such stacks.")
    return chosen


def serves_every_block(match: MLPMatch) -> bool:
    """An FFN outside any stack of blocks, called more than once with the same weights: the
    repeated block is the one shared module (ALBERT), so it is every block's FFN."""
    return match.stack is None and len(match.site.every_call) > 1


def _calls(pattern, match: MLPMatch) -> bool:
    """`pattern(match)` as a bool; an exception inside it names the FFN and the callable."""
    try:
        return bool(pattern(match))
    except Exception as error:  # noqa: BLE001 - the user's code: say where it failed
        name = getattr(pattern, "__qualname__", type(pattern).__name__)
        raise UpcycleConfigError(
            f"pattern={name} raised {type(error).__name__}: {error} on FFN {match.describe()}; "
            "the callable gets an upcycle_fx.MLPMatch (index, kind, activation, d_model, d_ff, "
            "paths, stack, block) and returns True to convert it.") from error


def selection_reason(pattern: PatternSpec, match: MLPMatch, selected: bool) -> tuple[str, str]:
    """Why `pattern` takes (`selected`) or leaves `match`: (in a few words, in a sentence)."""
    if pattern == "every_other_mlp":
        rule = "pattern every_other_mlp takes odd blocks (1, 3, 5, ...) of each stack of blocks"
        if serves_every_block(match):
            return "shared by every block", (f"{rule}; this FFN's weights are shared by all "
                                             f"{len(match.site.every_call)} calls (one MoE serves them all)")
        if match.stack is None:
            return "in no stack", f"{rule}; this FFN is in none (use pattern='all' or its index)"
        parity = "odd" if match.block % 2 else "even"
        return f"{parity} block", f"{rule}; this FFN is block {match.block} of {match.stack}"
    if pattern == "all":
        return "all", "pattern all takes every FFN"
    if callable(pattern):
        name = getattr(pattern, "__qualname__", type(pattern).__name__)
        return f"{name}: {selected}", f"pattern {name}(match) returned {selected}"
    listed = sorted(set(pattern))
    verb = "lists" if selected else "does not list"
    return ("listed" if selected else "not listed"), f"pattern {listed} {verb} FFN #{match.index}"
