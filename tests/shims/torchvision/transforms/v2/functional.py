"""Shim for ``torchvision.transforms.v2.functional``; see tests/shims/README.md."""

from ... import _stub

__getattr__ = _stub.make_getattr(__name__)
