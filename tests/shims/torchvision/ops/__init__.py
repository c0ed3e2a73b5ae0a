"""Shim for ``torchvision.ops``; see tests/shims/README.md."""

from .. import _stub
from . import misc  # noqa: F401

__getattr__ = _stub.make_getattr(__name__)
