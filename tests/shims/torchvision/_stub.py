"""Helpers for the test-only torchvision shim (see tests/shims/README.md).

Nothing here implements torchvision. Any public name looked up on a shim module
resolves to a placeholder class that can be imported, subclassed and used in
``isinstance`` checks, but raises ``RuntimeError`` when instantiated.
"""

from __future__ import annotations

import enum
import sys
from typing import Any, Callable


class InterpolationMode(enum.Enum):
    """Same members and values as ``torchvision.transforms.InterpolationMode``."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def unavailable(name: str, module: str) -> type:
    """Return a placeholder class named ``name`` whose constructor raises."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"torchvision shim: {name} is not available")

    return type(
        name,
        (),
        {
            "__init__": __init__,
            "__module__": module,
            "__doc__": f"Placeholder for torchvision's {name}; raises when instantiated.",
        },
    )


def make_getattr(module_name: str) -> Callable[[str], type]:
    """Build a module-level ``__getattr__`` (PEP 562) for the shim module ``module_name``.

    Placeholders are cached on the module, so repeated lookups return the same class
    (``isinstance`` checks stay consistent). Private and dunder names raise
    ``AttributeError`` as usual, so the import machinery, ``copy``, ``pickle``
    and ``inspect`` behave normally.
    """

    def __getattr__(name: str) -> type:
        if name.startswith("_"):
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        cls = unavailable(name, module_name)
        setattr(sys.modules[module_name], name, cls)
        return cls

    return __getattr__
