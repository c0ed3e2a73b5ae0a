"""Shim for ``torchvision.transforms.v2`` (imported by transformers' image processors, which the
Trainer imports); see tests/shims/README.md."""

from ... import _stub
from . import functional  # noqa: F401

__getattr__ = _stub.make_getattr(__name__)
