"""The graph outputs' names: the model's own (`logits`, `last_hidden_state`, ...), not `linear_12`.

A Hugging Face model is exported returning a plain tuple (shapes.py), whose entries are the
non-None fields of its `ModelOutput` in order; one eager run with `return_dict=True` gives those
field names. A tuple inside a field (e.g. `hidden_states`) gives `<field>_<i>`. A model that
returns a single tensor gets `output`, a tuple or list `output_<i>`, a dict its keys.
The names are applied after the export, and only when they are exactly as many as the graph's
outputs and clash with no other value of the graph: otherwise torch's names stay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ...capture.inputs import is_hf_model
from .errors import OnnxExportError
from .shapes import ExportInputs


def output_names(model: nn.Module, inputs: ExportInputs) -> list[str] | None:
    """Names for the flattened outputs of `model` on `inputs`, or None where they cannot be told.

    Runs the model once (call it with the export's lowerings installed: the MoE layers' own
    forward records statistics)."""
    constants = dict(inputs.constants)
    if is_hf_model(model):
        constants["return_dict"] = True
    try:
        with torch.no_grad():
            result = model(*inputs.args, **inputs.kwargs, **constants)
    except Exception as error:
        raise OnnxExportError(
            f"the model does not run on the example inputs ({type(error).__name__}: {error}); pass "
            "args=/kwargs= the model's forward takes (tensors of the right shape and dtype).") from error
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


def name_outputs(program, names: list[str] | None) -> None:
    """Rename the graph outputs of the exported `program` to `names` (see the module docstring)."""
    outputs = program.model.graph.outputs
    if not names or len(names) != len(outputs):
        return
    inputs = {value.name for value in program.model.graph.inputs}
    if inputs & set(names) or any(value.producer() is None for value in outputs):
        return
    taken = {value.name for node in program.model.graph.all_nodes() for value in node.outputs} - {
        value.name for value in outputs}
    taken |= set(program.model.graph.initializers)
    if taken & set(names):
        return
    for value, name in zip(outputs, names):
        value.metadata_props["pkg.torch.onnx.original_node_name"] = str(value.name)
        value.name = name
