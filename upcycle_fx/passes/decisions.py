"""A decision for every FFN candidate: selected, not selected (and why), or rejected (and why).

Found FFNs are selected or not by the pattern (`select.py`), or rejected when the rewrite could
not replace them (their weights are used elsewhere, a hook on a module the MoE removes);
candidates a pattern matched but refused (`NearMiss`) are rejected with the pattern's reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import PatternSpec
from ..errors import NoMLPSelectedError, RewriteError
from .find_mlps import MLPList, MLPMatch
from .select import select_mlps, selection_reason
from .splice import check_spliceable, enclosing_module
from .upcycle import _check_replaceable, plan_swap

SELECTED, NOT_SELECTED, REJECTED = "selected", "not selected", "rejected"
SHOWN_NEAR_MISSES = 5  # in the message of NoMLPFoundError


@dataclass(frozen=True)
class Decision:
    """What became of one candidate. `match` is the FFN (None for a rejected near miss)."""

    status: str          # "selected" | "not selected" | "rejected"
    where: str           # module path(s)
    kind: str            # dense / gated / fused_gated: the pattern that found or matched it
    activation: str
    reason: str
    match: MLPMatch | None = None
    note: str = ""       # the reason in a few words (a table column); "" for rejected ones

    @property
    def index(self) -> int | None:
        return None if self.match is None else self.match.index

    def __str__(self) -> str:
        number = "-" if self.index is None else f"#{self.index}"
        activation = f" {self.activation}" if self.activation else ""
        return f"{number} {self.where}: {self.kind}{activation}: {self.status} ({self.reason})"


def decide(model: nn.Module, mlps: MLPList, pattern: PatternSpec) -> list[Decision]:
    """One Decision per found FFN (execution order), then one per near miss.

    A pattern that selects nothing leaves every FFN "not selected"; other pattern errors (indices
    out of range, a callable that raises) are raised as `select_mlps` raises them."""
    try:
        chosen = {m.index for m in select_mlps(mlps, pattern)} if mlps else set()
    except NoMLPSelectedError:
        chosen = set()
    decisions = []
    for m in mlps:
        where = m.path or "<model>"
        problem = replace_problem(model, m)
        if problem is not None:
            fate = ("the pattern selects it, so the rewrite would stop with RewriteError: leave it out"
                    if m.index in chosen else "the pattern leaves it dense anyway")
            decisions.append(Decision(REJECTED, where, m.kind, m.activation, f"{problem}; {fate}", m))
        else:
            status = SELECTED if m.index in chosen else NOT_SELECTED
            note, reason = selection_reason(pattern, m, m.index in chosen)
            decisions.append(Decision(status, where, m.kind, m.activation, reason, m, note))
    for miss in mlps.near_misses:
        decisions.append(Decision(REJECTED, miss.where, miss.pattern, miss.activation,
                                  f"not an FFN the {miss.pattern} pattern accepts: {miss.reason}"))
    return decisions


def replace_problem(model: nn.Module, match: MLPMatch) -> str | None:
    """Why the rewrite could not replace this FFN (the RewriteError it would raise), or None."""
    try:
        plan = plan_swap(match)
        _check_replaceable(model, match, plan)
        if plan is None:
            check_spliceable(model, enclosing_module(match))
    except RewriteError as error:
        return str(error)
    return None


def explain(mlps: MLPList) -> str:
    """The decisions, one line each (the table `upcycle-fx inspect` prints, as plain text)."""
    if not mlps.decisions:
        if mlps or mlps.near_misses:
            return "no decisions recorded: upcycle_fx.find_mlps(model, pattern=...) makes them"
        return "no FFN candidates (nothing matched a pattern)"
    return "\n".join(str(d) for d in mlps.decisions)


def nothing_found_message(model: nn.Module, mlps: MLPList) -> str:
    """The message of NoMLPFoundError: the near misses (where and why) and what to try."""
    lines = [f"{type(model).__name__}: no FFN (Linear -> activation -> Linear, gated or fused "
             "gated) was found."]
    misses = mlps.near_misses
    if misses:
        lines.append(f"{len(misses)} candidate(s) rejected"
                     + (f", the first {SHOWN_NEAR_MISSES}:" if len(misses) > SHOWN_NEAR_MISSES else ":"))
    for miss in misses[:SHOWN_NEAR_MISSES]:
        activation = f" ({miss.activation})" if miss.activation else ""
        lines.append(f"  rejected {miss.pattern} candidate {miss.where}{activation}: {miss.reason}")
    for path, reason in mlps.capture_failures[:SHOWN_NEAR_MISSES]:
        lines.append(f"  could not capture {path or '<model>'}: {reason}")
    lines.append("If the model has an FFN, pass example_inputs= so it can be captured, mark "
                 "opaque modules with leaf_modules=, or register its activation with "
                 "upcycle_fx.register_activation.")
    return "\n".join(lines)
