"""Shim for ``torchvision.transforms``; see tests/shims/README.md."""

from .. import _stub
from .._stub import InterpolationMode  # noqa: F401
from . import functional  # noqa: F401

__getattr__ = _stub.make_getattr(__name__)
