"""Shared pytest setup for upcycle_fx.

Section 1 (environment) must stay at the top: it runs before any test module
imports transformers, huggingface_hub or timm. Fixtures go in section 2.
"""

from __future__ import annotations

import os
import pathlib
import sys

# --------------------------------------------------------------------------- 1. environment

# Never touch the network: huggingface_hub reads these when it is first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

SHIMS = pathlib.Path(__file__).resolve().parent / "shims"


def _use_torchvision_shim_if_needed() -> bool:
    """Put tests/shims on sys.path when no real torchvision imports (see shims/README.md)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # missing, or a CUDA wheel beside CPU torch ("torchvision::nms does not exist")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        if str(SHIMS) not in sys.path:
            sys.path.insert(0, str(SHIMS))
        return True
    return False


USING_TORCHVISION_SHIM = _use_torchvision_shim_if_needed()

# --------------------------------------------------------------------------- 2. fixtures
