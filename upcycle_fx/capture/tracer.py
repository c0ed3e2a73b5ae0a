"""`CaptureTracer`: an FX tracer with a leaf policy, module-call spans and shadow values.

* Leaf policy (`leaves.py`) keeps FFN building blocks as single nodes.
* Every module call (leaf or not) is recorded as a `ModuleSpan`: its input and output nodes
  and the range of nodes it created. The rewrite uses spans to find the module that holds
  exactly one FFN.
* With example inputs, each proxy carries a concrete "shadow" value computed alongside the
  trace. Shadows answer `.dtype`, `.device`, `bool(x)`, `len(x)` and iteration on proxies and
  let tensor constructors take proxy sizes; the graph is then specialised on the example,
  and each such specialisation is recorded. This is what transformers 4.x's HFTracer did
  with meta tensors, and what HF 5.x models need to be captured at all.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence
from unittest import mock

import torch
from torch import fx

from ._fx_private import add_leaf_functions, untraced_module_calls
from .leaves import LeafPolicy

_HF_MASK_FUNCTIONS = (
    "create_causal_mask", "create_sliding_window_causal_mask", "create_bidirectional_mask",
    "create_chunked_causal_mask", "create_masks_for_generate",
)
_TENSOR_CONSTRUCTORS = ("ones", "zeros", "full", "empty", "arange", "ones_like", "zeros_like",
                        "tensor")


@dataclass
class ModuleSpan:
    """One module call seen during tracing: the nodes it consumed, produced and created."""

    path: str
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    first: int  # order of the first node created inside the call
    end: int    # one past the last

    def created(self, node: fx.Node) -> bool:
        return self.first <= node.meta["order"] < self.end


def _proxy_nodes(value: Any) -> list[fx.Node]:
    nodes: list[fx.Node] = []
    fx.node.map_aggregate(value, lambda v: nodes.append(v.node) if isinstance(v, fx.Proxy) else v)
    return nodes


def _shadow(value: Any) -> Any:
    if isinstance(value, fx.Proxy):
        return value.node.meta.get("shadow")
    if isinstance(value, fx.Node):
        return value.meta.get("shadow")
    return value


class ShadowProxy(fx.Proxy):
    """A proxy that answers questions about its concrete example value (see module doc)."""

    @property
    def _value(self) -> Any:
        return self.node.meta.get("shadow")

    @property
    def dtype(self):
        value = self._value
        return value.dtype if isinstance(value, torch.Tensor) else self.__getattr__("dtype")

    @property
    def device(self):
        value = self._value
        return value.device if isinstance(value, torch.Tensor) else self.__getattr__("device")

    def __bool__(self) -> bool:
        value = self._value
        if value is None:
            return super().__bool__()
        self.tracer.specialize(f"bool({self.node.name}) -> {bool(value)}")
        return bool(value)

    def __len__(self) -> int:
        value = self._value
        if value is None:
            return super().__len__()
        self.tracer.specialize(f"len({self.node.name}) -> {len(value)}")
        return len(value)

    def __iter__(self):
        value = self._value
        if isinstance(value, (tuple, list, torch.Size)):
            self.tracer.specialize(f"iter({self.node.name}) over {len(value)} items")
            return iter([self[i] for i in range(len(value))])
        return super().__iter__()


class CaptureTracer(fx.Tracer):
    """Tracer used for every capture; `shadow_inputs` turns on shadow values (see module doc)."""

    def __init__(self, leaf_policy: LeafPolicy | None = None,
                 shadow_inputs: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.leaf_policy = leaf_policy or LeafPolicy()
        self.shadow_inputs = None if shadow_inputs is None else list(shadow_inputs)
        self.spans: list[ModuleSpan] = []
        self.call_counts: Counter[str] = Counter()
        self.specializations: list[str] = []
        self._order = 0
        self._placeholders = 0
        self._install_hf_leaf_functions()

    # --- leaves -------------------------------------------------------------------------
    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        return self.leaf_policy.is_leaf(m, module_qualified_name)

    def _install_hf_leaf_functions(self) -> None:
        if "transformers" not in sys.modules:
            return
        try:
            masking = importlib.import_module("transformers.masking_utils")
        except ImportError:
            return
        functions = [getattr(masking, n) for n in _HF_MASK_FUNCTIONS if hasattr(masking, n)]
        modules = [m for name, m in list(sys.modules.items())
                   if m is not None and name.startswith("transformers.models.") and ".modeling_" in name]
        add_leaf_functions(self, functions, modules)

    # --- spans --------------------------------------------------------------------------
    @property
    def node_count(self) -> int:
        """Nodes created so far (the `order` the next node will get)."""
        return self._order

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta["order"] = self._order
        self._order += 1
        return node

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        self.call_counts[path] += 1
        first = self._order
        inputs = _proxy_nodes((args, kwargs))
        result = super().call_module(m, forward, args, kwargs)
        self.spans.append(ModuleSpan(path, inputs, _proxy_nodes(result), first, self._order))
        return result

    # --- shadows ------------------------------------------------------------------------
    def specialize(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "torch/fx" not in f.filename]
        where = f" at {frames[-1].filename.rsplit('site-packages/', 1)[-1]}:{frames[-1].lineno}" if frames else ""
        self.specializations.append(what + where)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShadowProxy(node, self) if self.shadow_inputs is not None else super().proxy(node)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if self.shadow_inputs is not None:
            proxy.node.meta["shadow"] = self._compute_shadow(kind, target, args, kwargs)
        return proxy

    def _compute_shadow(self, kind, target, args, kwargs) -> Any:
        if kind == "placeholder":
            index = self._placeholders
            self._placeholders += 1
            return self.shadow_inputs[index] if index < len(self.shadow_inputs) else None
        concrete_args = fx.node.map_aggregate(args, _shadow)
        concrete_kwargs = fx.node.map_aggregate(kwargs, _shadow)
        try:
            with untraced_module_calls(), torch.no_grad():
                if kind == "get_attr":
                    return _getattr_path(self.root, target)
                if kind == "call_function":
                    return target(*concrete_args, **concrete_kwargs)
                if kind == "call_method":
                    return getattr(concrete_args[0], target)(*concrete_args[1:], **concrete_kwargs)
                if kind == "call_module":
                    return self.root.get_submodule(target)(*concrete_args, **concrete_kwargs)
        except Exception:  # noqa: BLE001 - a shadow is best effort; None means "unknown"
            return None
        return None

    @contextlib.contextmanager
    def _proxy_aware_constructors(self):
        """torch.ones(b, s) etc. with proxy sizes become graph nodes instead of failing."""
        with contextlib.ExitStack() as stack:
            for name in _TENSOR_CONSTRUCTORS:
                original = getattr(torch, name)

                def constructor(*args, _original=original, **kwargs):
                    flat = list(args) + list(kwargs.values())
                    flat += [x for a in args if isinstance(a, (tuple, list)) for x in a]
                    if any(isinstance(a, fx.Proxy) for a in flat):
                        return self.create_proxy("call_function", _original, args, kwargs)
                    return _original(*args, **kwargs)

                stack.enter_context(mock.patch.object(torch, name, constructor))
            yield

    def trace(self, root, concrete_args=None) -> fx.Graph:
        self._placeholders = 0
        if self.shadow_inputs is None:
            return super().trace(root, concrete_args)
        with self._proxy_aware_constructors(), torch.no_grad():
            return super().trace(root, concrete_args)


def _getattr_path(root: torch.nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value
