"""The only place that touches private torch internals (torch.fx, and nn.Module's hook tables).

Two needs of the tracer, both from Hugging Face 5.x (research/anchors-fx-and-style.md §1.3):
* leaf *functions* whose callers live in modules FX does not scan: HF wraps forwards in
  decorators whose `__globals__` belong to `transformers.utils.generic`, so the public
  `autowrap_functions` never patches `masking_utils.create_causal_mask` as seen from
  `modeling_llama`; we extend the private `_autowrap_search` / `_autowrap_function_ids`.
* running real module code in the middle of a trace (shadow values) without recording nodes:
  we restore FX's saved originals `_orig_module_call` / `_orig_module_getattr`.
And one of the patterns: the hooks registered on a module (or globally, on every module), which
torch keeps in private dictionaries and exposes no public way to list.
Checked against torch 2.10 - 2.13.
"""

from __future__ import annotations

import contextlib
import types
from typing import Callable, Iterable, Iterator

import torch
from torch import fx
from torch import nn
from torch.fx import _symbolic_trace as _st
from torch.nn.modules import module as _nn_module

_HOOK_TABLES = {"_forward_pre_hooks": "forward pre-hook", "_forward_hooks": "forward hook",
                "_backward_pre_hooks": "backward pre-hook", "_backward_hooks": "backward hook"}


def add_leaf_functions(tracer: fx.Tracer, functions: Iterable[Callable],
                       search_modules: Iterable[types.ModuleType]) -> None:
    """Make `functions` leaf calls (one graph node each) wherever they are looked up."""
    tracer._autowrap_function_ids.update(id(fn) for fn in functions)
    for module in search_modules:
        if module not in tracer._autowrap_search:
            tracer._autowrap_search.append(module)


@contextlib.contextmanager
def untraced_module_calls() -> Iterator[None]:
    """Within a trace, call modules for real: no nodes recorded, no proxies handed out."""
    call, getattr_ = torch.nn.Module.__call__, torch.nn.Module.__getattr__
    torch.nn.Module.__call__ = _st._orig_module_call
    torch.nn.Module.__getattr__ = _st._orig_module_getattr
    try:
        yield
    finally:
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = call, getattr_


def module_hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on `module` itself, e.g. ["forward hook"]."""
    return [kind for table, kind in _HOOK_TABLES.items() if getattr(module, table, None)]


def global_module_hooks() -> list[str]:
    """The kinds of hooks registered for every module (`register_module_forward_hook` & co.)."""
    return [kind for table, kind in _HOOK_TABLES.items() if getattr(_nn_module, "_global" + table, None)]
