"""Shim for ``torchvision.ops.misc`` (timm imports ``FrozenBatchNorm2d`` from here)."""

from .. import _stub

FrozenBatchNorm2d = _stub.unavailable("FrozenBatchNorm2d", __name__)

__getattr__ = _stub.make_getattr(__name__)
