"""Integrations with the tools users train and share models with (Hugging Face transformers).

Importing this package does not import transformers: the `from_pretrained` loader is
registered when transformers loads its model code (or at once, if it already has), so a
checkpoint saved from an upcycled model loads whether `import upcycle_fx` came before or after
`import transformers`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings

from torch import nn

from .aux_loss import aux_loss_in_output, installed_hook, set_aux_loss_in_output

__all__ = ["MoETrainerCallback", "attach", "aux_loss_in_output", "set_aux_loss_in_output"]

TRANSFORMERS_MODEL_CODE = "transformers.modeling_utils"  # defines from_pretrained
QUANT_METHOD = "upcycle_fx"  # config.json's quantization_config.quant_method of upcycled models


def attach(model: nn.Module) -> None:
    """Make a freshly upcycled `model` work on the stock paths: its training loss includes the
    aux losses, and a transformers model saves what `from_pretrained` needs to rebuild it."""
    if installed_hook(model) is None:
        set_aux_loss_in_output(model, True)
    if TRANSFORMERS_MODEL_CODE in sys.modules:
        from .hf_quantizer import attach_record

        attach_record(model)


def _register() -> None:
    try:
        importlib.import_module(".hf_quantizer", __name__)
    except Exception as error:  # never break the user's import of transformers
        warnings.warn(f"upcycle_fx could not register its from_pretrained loader with transformers "
                      f"({type(error).__name__}: {error}); checkpoints of upcycled models will refuse "
                      "to load.", RuntimeWarning, stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs `_register` right after transformers' model code has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TRANSFORMERS_MODEL_CODE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """The module's own loader, plus `_register` once the module has run; it puts the original
    loader back on the module so that source lookups (inspect, linecache) work as before."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        _uninstall()
        _register()


_FINDER = _RegisterAfterImport()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def register_with_transformers() -> None:
    """Register the loader now if transformers' model code is loaded, else when it is."""
    if TRANSFORMERS_MODEL_CODE in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def __getattr__(name: str):
    if name == "MoETrainerCallback":
        from .trainer import MoETrainerCallback

        return MoETrainerCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
