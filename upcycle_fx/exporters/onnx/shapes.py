"""Example inputs and dynamic dimensions for an export.

Defaults: a Hugging Face model with no inputs given gets its own config-made example inputs
(`capture.inputs.hf_example_inputs`) and always runs without KV cache and with tuple outputs
(`hf_fixed_kwargs`: a cache object is not a graph output). Non-tensor keyword arguments
(flags such as `use_cache`) are constants of the graph: they are bound to `forward` for the
export, so only tensors are graph inputs (torch.export also mishandles non-tensors passed
through a `**kwargs` parameter, which is where Hugging Face 5 takes `return_dict`).

Every tensor input gets a dynamic dim 0 ("batch"); inputs of rank 2 or 3 (token ids, masks,
embeddings) also a dynamic dim 1 ("seq", or "decoder_seq" for inputs whose name says decoder).
Images keep their size. Pass `dynamic_shapes=` (torch.export's format) for anything else.
"""

from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...capture.inputs import hf_example_inputs, hf_fixed_kwargs, is_hf_model
from .errors import OnnxExportError


@dataclass
class ExportInputs:
    """What to export with: positional args, tensor kwargs (graph inputs), constant kwargs."""

    args: tuple
    kwargs: dict[str, Any]
    constants: dict[str, Any] = field(default_factory=dict)


def example_inputs(model: nn.Module, args: tuple, kwargs: dict | None) -> ExportInputs:
    """Split and complete the user's example inputs (see the module docstring)."""
    args, kwargs = tuple(args), dict(kwargs or {})
    if is_hf_model(model):
        if not args and not kwargs:
            kwargs = dict(hf_example_inputs(model).kwargs)
        kwargs = {**hf_fixed_kwargs(model), **kwargs}
    elif not args and not kwargs:
        raise OnnxExportError(f"{type(model).__name__}: export_onnx needs example inputs for a "
                              "model that is not a Hugging Face model; pass args=(...) or kwargs={...}")
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    return ExportInputs(args, tensors, constants)


@contextmanager
def constants_bound(model: nn.Module, constants: dict[str, Any]):
    """Within the block, `model.forward` has `constants` bound as keyword arguments."""
    if not constants:
        yield
        return
    own = vars(model).get("forward")   # an instance-level forward (swap.py's, for a bare MoE)
    model.forward = functools.partial(model.forward, **constants)
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def default_dynamic_shapes(model: nn.Module, inputs: ExportInputs) -> dict[str, Any]:
    """torch.export dynamic_shapes keyed by forward parameter name (module docstring)."""
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*inputs.args, **inputs.kwargs)
    except TypeError as error:
        raise OnnxExportError(f"{type(model).__name__}.forward does not take these example "
                              f"inputs: {error}") from None
    spec: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            spec[name] = {key: _dims(key, item) for key, item in value.items()}
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(_dims(name, item) for item in value)
        else:
            spec[name] = _dims(name, value)
    return spec


def _dims(name: str, value: Any) -> dict[int, str] | None:
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return None
    dims = {0: "batch"}
    if value.dim() in (2, 3):
        dims[1] = "decoder_seq" if "decoder" in name else "seq"
    return dims
