"""Reproducers: Python source for a case, with values `repr` does not round-trip (nan, inf)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any


def source(value: Any) -> str:
    """Python source that evaluates to `value` (cases, specs, containers, floats, markers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{source(k)}: {source(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(source(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + "".join(f"{source(v)}, " for v in value) + ")"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(value)}
        parts = [f"{f.name}={source(getattr(value, f.name))}" for f in dataclasses.fields(value)
                 if f.repr and getattr(value, f.name) != defaults[f.name]]
        return f"{type(value).__name__}({', '.join(parts)})"
    return repr(value)


def reproducer(case: Any) -> str:
    """Two lines that re-run `case` and print its verdict."""
    return f"from upcycle_fx.testing.fuzz import *\nprint({source(case)}.run())"
