"""Test-only stand-in for torchvision; see tests/shims/README.md.

Put on ``sys.path`` by tests/conftest.py only when the real torchvision cannot be
imported. It satisfies timm's import-time ``from torchvision... import ...``
statements; any placeholder raises ``RuntimeError`` when used.
"""

from . import _stub

__version__ = "0.0.0+shim"
IS_SHIM = True

from . import datasets, ops, transforms  # noqa: E402

__getattr__ = _stub.make_getattr(__name__)
