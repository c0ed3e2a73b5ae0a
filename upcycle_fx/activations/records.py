"""Named FFN activations, one record each, in one registry that every consumer reads.

A record says what the activation computes (its reference function), how model code spells it
(module classes, functions, tensor methods, a chain of elementary ops) and how the fast paths
compute it (a Triton function for the decode kernel, the activation of onnxruntime's fused
`com.microsoft::MoE` node). The patterns name activations from the spellings; a fast path
trusts a name only after the module has been probed against the reference
(`upcycle_fx.moe.activations.probe`). An activation without a record is still accepted where
its effect is element-wise (`elementwise.py`); it runs on the generic paths.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from torch import Tensor

ONNX_ACTIVATIONS = ("relu", "gelu", "silu")   # what com.microsoft::MoE computes for plain experts
GELU_FORMS = ("erf", "tanh")


@dataclass(frozen=True)
class Spelling:
    """One way code writes an activation: a module class name, a function (call_function), or a
    tensor method name (call_method); `where` lists the module attributes or call keywords it
    must have, `args` the constant arguments after the input (`x ** 2`: `operator.pow`, (2,))."""

    target: str | Callable
    where: tuple[tuple[str, Any], ...] = ()
    args: tuple | None = None


def spelled(target: str | Callable, *args, **where) -> Spelling:
    """`spelled("GELU", approximate="tanh")`, `spelled(operator.pow, 2)`."""
    return Spelling(target, tuple(sorted(where.items())), args or None)


@dataclass(frozen=True)
class OnnxForm:
    """How `com.microsoft::MoE` computes the activation: `activation_type` for plain experts
    (relu | gelu | silu; `gelu` says which GELU, erf or tanh: targets differ), and for gated
    experts the SwiGLU gate g·sigmoid(α·g) with `swiglu_alpha` = α, where it is of that form."""

    activation_type: str | None = None
    gelu: str | None = None
    swiglu_alpha: float | None = None


@dataclass(frozen=True)
class Activation:
    """One named FFN activation.

    name: the name reports, `find_mlps` and checkpoints use ("gelu_tanh").
    reference: the function in float32 (what the probe compares a module with).
    modules / calls: class names, and functions or tensor method names, that compute it
      (`Spelling`s where attributes or keywords matter).
    chain: the elementary activations whose composition it is (("relu", "square") for relu2).
    triton: a `@triton.jit` function z -> act(z) on float32 values, or "module:attribute"
      naming one (imported on first use, so records never import Triton).
    onnx: its `OnnxForm`, or None (then the ONNX export lowers it with standard ops).
    ffn: False for an op that is not a whole FFN activation by itself (tanh: pooler heads).
    """

    name: str
    reference: Callable[[Tensor], Tensor]
    modules: tuple[str | Spelling, ...] = ()
    calls: tuple[Callable | str | Spelling, ...] = ()
    chain: tuple[str, ...] = ()
    triton: Any = None
    onnx: OnnxForm | None = None
    ffn: bool = True


_RECORDS: dict[str, Activation] = {}
_triton_forms: dict[str, Any] = {}


def add_activation(record: Activation, *, replace: bool = False) -> Activation:
    """Register `record`; every consumer (patterns, probe, Triton decode kernel, ONNX export,
    reports) reads it from here. A name already registered needs `replace=True`."""
    from ..errors import UpcycleConfigError

    problem = _record_problem(record)
    if problem is None and record.name in _RECORDS and not replace:
        problem = f"an activation named {record.name!r} is registered already (pass replace=True)"
    if problem is not None:
        raise UpcycleConfigError(f"add_activation: {problem}.")
    _RECORDS[record.name] = record
    _triton_forms.pop(record.name, None)
    return record


def remove_activation(name: str) -> Activation | None:
    """Unregister `name` (returns its record, or None if there was none)."""
    _triton_forms.pop(name, None)
    return _RECORDS.pop(name, None)


def get_activation(name: str) -> Activation | None:
    """The record of `name`, or None for an activation known only by what it does."""
    return _RECORDS.get(name)


def activation_names() -> tuple[str, ...]:
    return tuple(_RECORDS)


def _record_problem(record: Activation) -> str | None:
    if not isinstance(record, Activation):
        return f"{record!r} is not an upcycle_fx.activations.Activation"
    if not (isinstance(record.name, str) and record.name.isidentifier()):
        return f"name {record.name!r} must be an identifier such as 'mish'"
    if not callable(record.reference):
        return f"{record.name}: reference {record.reference!r} is not callable"
    unknown = [op for op in record.chain if op not in _RECORDS]
    if unknown:
        return f"{record.name}: chain names unregistered activations {unknown}"
    onnx = record.onnx
    if onnx is not None:
        if onnx.activation_type not in (None, *ONNX_ACTIVATIONS):
            return f"{record.name}: onnx activation_type {onnx.activation_type!r} is not one of {ONNX_ACTIVATIONS}"
        if (onnx.activation_type == "gelu") != (onnx.gelu in GELU_FORMS):
            return f"{record.name}: an onnx gelu form names its GELU as one of {GELU_FORMS} (and only gelu does)"
    if record.triton is not None and isinstance(record.triton, str) and ":" not in record.triton:
        return f"{record.name}: triton {record.triton!r} must be a function or 'module:attribute'"
    return None


# --------------------------------------------------------------------------- lookups


def _matches(spelling: Spelling | str | Callable, target, read: Callable[[str], Any], args: tuple) -> int:
    """-1 if `spelling` does not match; else how many requirements it checked (more = more specific)."""
    if not isinstance(spelling, Spelling):
        spelling = Spelling(spelling)
    if spelling.target is not target and spelling.target != target:
        return -1
    if spelling.args is not None and tuple(args) != spelling.args:
        return -1
    if any(read(key) != value for key, value in spelling.where):
        return -1
    return len(spelling.where) + (spelling.args is not None)


def _best(candidates: list[tuple[int, str]]) -> str | None:
    found = [c for c in candidates if c[0] >= 0]
    return max(found, key=lambda c: c[0])[1] if found else None


def name_of_module(module) -> str | None:
    """The record a module's class spells (the most specific spelling wins)."""
    cls = type(module).__name__
    return _best([(_matches(s, cls, lambda key: getattr(module, key, None), ()), r.name)
                  for r in _RECORDS.values() for s in r.modules])


def name_of_call(target, args: tuple, kwargs: dict) -> str | None:
    """The record a call spells: `target` a function (call_function) or a method name
    (call_method); `args` the constant arguments after the input."""
    return _best([(_matches(s, target, kwargs.get, args), r.name)
                  for r in _RECORDS.values() for s in r.calls])


def name_of_chain(ops: tuple[str, ...]) -> str | None:
    """The record whose chain of elementary activations is `ops`."""
    return next((r.name for r in _RECORDS.values() if r.chain and r.chain == tuple(ops)), None)


def is_ffn_activation(name: str) -> bool:
    """Whether an FFN may have `name` as its activation: every element-wise activation may,
    except the records marked `ffn=False` (tanh alone is a pooler's or a head's)."""
    record = _RECORDS.get(name)
    return record is None or record.ffn


def describe(name: str) -> str:
    """`gelu_tanh` for a named activation, "element-wise `BloomGelu`" for one known only by
    what it does."""
    return name if name in _RECORDS else f"element-wise `{name}`"


def triton_form(name: str):
    """The record's Triton function (imported on first use), or None."""
    record = _RECORDS.get(name)
    if record is None or record.triton is None:
        return None
    if name not in _triton_forms:
        form = record.triton
        if isinstance(form, str):
            module, _, attribute = form.partition(":")
            form = getattr(importlib.import_module(module), attribute)
        _triton_forms[name] = form
    return _triton_forms[name]
