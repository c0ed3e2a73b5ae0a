"""The pattern registry: most specific patterns first (fused before gated before dense)."""

from __future__ import annotations

from typing import TypeVar

from .base import FFNPattern

PATTERNS: list[FFNPattern] = []
P = TypeVar("P", bound=type)


def register_pattern(cls: P) -> P:
    """Class decorator: add one FFN family to the patterns every `find_mlps` run tries."""
    PATTERNS.append(cls())
    return cls
