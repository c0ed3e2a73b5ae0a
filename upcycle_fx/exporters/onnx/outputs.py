"""The graph outputs' names: the model's own (`logits`, `last_hidden_state`, ...), not `linear_12`.

A Hugging Face model is exported returning a plain tuple (shapes.py), whose entries are the
non-None fields of its `ModelOutput` in order; one eager run with `return_dict=True` gives those
field names. A tuple inside a field (e.g. `hidden_states`) gives `<field>_<i>`. A model that
returns a single tensor gets `output`, a tuple or list `output_<i>`, a dict its keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...capture.inputs import is_hf_model
from .shapes import ExportInputs


def output_names(model: nn.Module, inputs: ExportInputs) -> list[str] | None:
    """Names for the flattened outputs of `model` on `inputs`, or None where they cannot be told.

    Runs the model once (call it with the export's lowerings installed: the MoE layers' own
    forward records statistics)."""
    constants = dict(inputs.constants)
    if is_hf_model(model):
        constants["return_dict"] = True
    with torch.no_grad():
        result = model(*inputs.args, **inputs.kwargs, **constants)
    names = _flatten("output", result)
    return names if names and len(set(names)) == len(names) else None


def _flatten(name: str, value: Any) -> list[str]:
    if isinstance(value, torch.Tensor):
        return [name]
    if isinstance(value, Mapping):   # a ModelOutput holds only its non-None fields as items
        return [n for key, item in value.items() if item is not None
                for n in _flatten(str(key), item)]
    if isinstance(value, (tuple, list)):
        return [n for i, item in enumerate(value) if item is not None
                for n in _flatten(f"{name}_{i}", item)]
    return []   # constants (ints, None) are not graph outputs
