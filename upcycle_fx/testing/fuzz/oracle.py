"""The invariants every trial is judged by, and the categories of the verdict.

A call into upcycle_fx must give an exact result (the upcycled model computes the dense model's
function, when the configuration preserves it) or a named error; it must never return a silently
wrong model, raise an unnamed exception, produce NaN where the dense model is finite, mutate the
user's model, or lose / half-write a checkpoint.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from ...errors import UpcycleError

FUNCTION_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9, torch.bfloat16: 5e-2, torch.float16: 1e-2}


class Category(str, enum.Enum):
    """Verdict of one trial; the order is the order of the report, best first."""

    EXACT = "exact"
    NAMED = "named error"
    SILENT_WRONG = "silent wrong"
    UNNAMED = "unnamed exception"
    NAN = "NaN"
    MUTATED = "input mutated"
    LOST = "data loss"

    @property
    def is_failure(self) -> bool:
        return self not in (Category.EXACT, Category.NAMED)


@dataclass
class Outcome:
    category: Category
    detail: str = ""


def named_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions that count as named: every `UpcycleError` (which includes `CheckpointError`
    and `OnnxExportError`)."""
    return (UpcycleError,)


def classify_exception(error: BaseException, where: str) -> Outcome:
    if isinstance(error, named_error_types()):
        return Outcome(Category.NAMED, f"{type(error).__name__}")
    return Outcome(Category.UNNAMED, f"{where}: {type(error).__name__}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:200]


# --------------------------------------------------------------------------- input snapshots


def _hook_ids(module: nn.Module, by_kind: bool = False) -> tuple:
    """The module's hooks: the very objects (is the input untouched?) or, `by_kind`, their types
    (a model rebuilt from a checkpoint holds new hook objects of the same kinds)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks")
    key = (lambda h: type(h).__qualname__) if by_kind else id
    return tuple(tuple(key(h) for h in getattr(module, n, {}).values()) for n in names)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.is_floating_point():
        return bool(torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all()
                    and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
    return bool(torch.equal(a, b))


@dataclass
class Snapshot:
    """What must not change in the user's model: every tensor bit for bit, the module tree,
    train/eval modes, hooks, requires_grad and parametrisations."""

    tensors: dict[str, torch.Tensor]
    modules: list[tuple[str, str, bool, tuple, bool]]
    requires_grad: dict[str, bool]

    @classmethod
    def of(cls, model: nn.Module, hooks_by_kind: bool = False) -> "Snapshot":
        tensors = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)}
        tensors |= {f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)
                    if b is not None}
        modules = [(name, type(m).__qualname__, m.training, _hook_ids(m, hooks_by_kind),
                    parametrize.is_parametrized(m))
                   for name, m in model.named_modules(remove_duplicate=False)]
        grads = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        return cls(tensors, modules, grads)

    def differences(self, model: nn.Module, hooks_by_kind: bool = False) -> list[str]:
        now = Snapshot.of(model, hooks_by_kind)
        found = []
        for name in sorted(set(self.tensors) | set(now.tensors)):
            a, b = self.tensors.get(name), now.tensors.get(name)
            if a is None or b is None:
                found.append(f"{name} {'added' if a is None else 'removed'}")
            elif a.dtype != b.dtype or a.shape != b.shape:
                found.append(f"{name} changed from {a.dtype} {tuple(a.shape)} to {b.dtype} {tuple(b.shape)}")
            elif not _same_tensor(a, b):
                found.append(f"{name} changed")
        if self.modules != now.modules:
            changed = [f"{x[0] or '<root>'}" for x, y in zip(self.modules, now.modules) if x != y]
            found.append(f"modules changed (class/mode/hooks/parametrisation): {changed[:4] or 'tree'}")
        flips = [n for n in self.requires_grad if now.requires_grad.get(n) != self.requires_grad[n]]
        if flips:
            found.append(f"requires_grad changed: {flips[:4]}")
        return found


# --------------------------------------------------------------------------- outputs


def float_outputs(output: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def eval_forward(model: nn.Module, inputs: tuple) -> list[torch.Tensor]:
    """The model's floating outputs in eval mode, without gradients (the model's modes are
    restored afterwards)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return float_outputs(model(*inputs))
    finally:
        for module, training in modes:
            module.training = training


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return float((actual - expected).abs().max() / scale)


def compare_outputs(actual: list[torch.Tensor], expected: list[torch.Tensor], *,
                    preserves: bool, reference: str = "the dense model") -> Outcome:
    """NaN where the reference is finite, then exactness for function-preserving configs."""
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        return Outcome(Category.SILENT_WRONG, f"outputs have other shapes than {reference}'s")
    for a, e in zip(actual, expected):
        bad = torch.isfinite(e) & ~torch.isfinite(a)
        if bad.any():
            return Outcome(Category.NAN, f"{int(bad.sum())} non-finite output(s) where {reference} "
                                         f"is finite ({a.dtype})")
    if not preserves:
        return Outcome(Category.EXACT, "finite (configuration does not preserve the function)")
    for a, e in zip(actual, expected):
        finite = torch.isfinite(e)
        if not finite.all():
            continue  # the dense model itself overflows here: nothing to compare against
        error = relative_error(a, e)
        tolerance = FUNCTION_TOLERANCE.get(e.dtype, 1e-5)
        if not error <= tolerance:
            return Outcome(Category.SILENT_WRONG, f"relative error {error:.3g} > {tolerance:g} ({e.dtype}) "
                                                  f"against {reference}, no error raised")
    return Outcome(Category.EXACT)


def check_conversion(model: nn.Module, reference: nn.Module, inputs: tuple,
                     convert: Callable[[nn.Module], nn.Module], *, preserves: bool,
                     may_mutate: bool = False, invalid: str | None = None) -> Outcome:
    """Run `convert(model)` under the oracle: input untouched, result exact (or finite, for
    configurations that change the function) or a named error. `reference` is an identical,
    separately built dense model (a deepcopy would not do: some models cannot be deep-copied,
    and that is for the code under test to handle). `invalid` names an argument that must be
    refused: a model returned anyway is a silent wrong result."""
    before = Snapshot.of(model)
    expected = eval_forward(reference, inputs)
    try:
        converted = convert(model)
    except Exception as error:  # noqa: BLE001 - classifying every exception is the point
        outcome = classify_exception(error, "conversion")
        converted = None
    mutated = [] if may_mutate else before.differences(model)
    if mutated:
        return Outcome(Category.MUTATED, "; ".join(mutated[:4]))
    if converted is None:
        return outcome
    if invalid is not None:
        return Outcome(Category.SILENT_WRONG, f"accepted invalid argument {invalid}")
    try:
        actual = eval_forward(converted, inputs)
    except Exception as error:  # noqa: BLE001
        return classify_exception(error, "first forward of the converted model")
    return compare_outputs(actual, expected, preserves=preserves)


@dataclass
class Trial:
    """One case and its verdict; `reproducer` is Python that re-runs the case."""

    family: str
    outcome: Outcome
    reproducer: str
    extra: dict = field(default_factory=dict)
