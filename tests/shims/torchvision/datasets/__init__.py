"""Shim for ``torchvision.datasets`` (timm imports CIFAR10, MNIST, ImageFolder, ...)."""

from .. import _stub

__getattr__ = _stub.make_getattr(__name__)
