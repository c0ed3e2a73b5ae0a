"""A model's full tensor state as flat names, and putting such a state back into a model.

Unlike `state_dict()`, the table holds every tensor the model computes with: parameters,
persistent buffers and non-persistent buffers (rotary tables, position ids), each once, with
tied weights recorded as aliases of their first name. Loading it back into a skeleton therefore
reproduces the saved model exactly, whatever device or initialisation the skeleton came with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import nn

from .errors import CheckpointDtypeError, CheckpointMismatchError


@dataclass
class TensorTable:
    """Unique tensors by first qualified name (module order), plus the names that alias them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)       # alias -> canonical name
    non_persistent: list[str] = field(default_factory=list)     # canonical names not in state_dict()
    parameters: set[str] = field(default_factory=set)            # canonical names that are Parameters


def _slots(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool, bool]]:
    """(qualified name, owner, attribute, tensor, is_parameter, persistent) for every tensor slot,
    shared modules and tied tensors included (once per place they are reachable)."""
    for path, module in model.named_modules(remove_duplicate=False):
        prefix = f"{path}." if path else ""
        for attr, param in module.named_parameters(recurse=False, remove_duplicate=False):
            yield prefix + attr, module, attr, param, True, True
        skipped = getattr(module, "_non_persistent_buffers_set", set())
        for attr, buffer in module.named_buffers(recurse=False, remove_duplicate=False):
            yield prefix + attr, module, attr, buffer, False, attr not in skipped


def tensor_table(model: nn.Module) -> TensorTable:
    """The model's tensors, each once; storage-sharing views of another tensor are copied."""
    table = TensorTable()
    by_identity: dict[int, str] = {}
    for name, _, _, tensor, is_param, persistent in _slots(model):
        canonical = by_identity.get(id(tensor))
        if canonical is not None:
            if canonical != name:
                table.aliases[name] = canonical
            continue
        by_identity[id(tensor)] = name
        table.tensors[name] = tensor
        if is_param:
            table.parameters.add(name)
        if not persistent:
            table.non_persistent.append(name)
    return table


def storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous tensors that safetensors accepts: distinct tensors that overlap in
    memory (views of one another) are copied, since one file entry cannot alias another."""
    out: dict[str, torch.Tensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if tensor.device.type != "meta" and tensor.numel():
            start = tensor.data_ptr()
            spans.append((start, start + tensor.numel() * tensor.element_size(), name))
        out[name] = tensor
    spans.sort()
    last_end = -1
    for start, end, name in spans:
        if start < last_end:
            out[name] = out[name].clone()
        last_end = max(last_end, end)
    return {name: t.contiguous() for name, t in out.items()}


def assign_state(model: nn.Module, tensors: Mapping[str, torch.Tensor], aliases: Mapping[str, str],
                 *, where: str) -> None:
    """Make `model` hold exactly `tensors` (no copy): every slot gets the tensor of its name or of
    the name it aliases, so tied weights come back as one Parameter. Raises
    CheckpointMismatchError naming what is missing, left over or of another shape."""
    made: dict[str, torch.Tensor] = {}
    missing, wrong_shape = [], []
    for name, module, attr, current, is_param, _ in list(_slots(model)):
        canonical = aliases.get(name, name)
        value = tensors.get(canonical)
        if value is None:
            missing.append(name)
            continue
        if tuple(value.shape) != tuple(current.shape):
            wrong_shape.append(f"{name}: file {tuple(value.shape)}, model {tuple(current.shape)}")
            continue
        if canonical not in made:
            made[canonical] = nn.Parameter(value, requires_grad=current.requires_grad) if is_param else value
        setattr(module, attr, made[canonical])
    unused = sorted(set(tensors) - set(made))
    if missing or wrong_shape or unused:
        raise CheckpointMismatchError(_mismatch(where, missing, unused, wrong_shape))


def check_stored(model: nn.Module, stored: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 aliases: Mapping[str, str], *, where: str) -> None:
    """Before any data is read: the stored tensors (name -> shape and dtype, from the file
    headers) must be exactly the model's, of its shapes, and of dtypes it can compute with: the
    model's kind of number (floating point, integer, bool) for every tensor, and for parameters
    one floating-point type throughout (plus float32, which mixed-precision models keep for some
    layers). CheckpointMismatchError / CheckpointDtypeError name what does not fit."""
    dangling = sorted(f"{alias} -> {name}" for alias, name in aliases.items() if name not in stored)
    if dangling:
        raise CheckpointMismatchError(f"{where}: {len(dangling)} tied tensor(s) refer to tensors the file does "
                                      f"not have: {', '.join(dangling[:6])}. The manifest's aliases do not "
                                      "belong to these weights; restore the checkpoint or save the model again.")
    missing, wrong_shape, wrong_kind, used = [], [], [], set()
    parameters: dict[str, torch.dtype] = {}
    for name, _, _, current, is_param, _ in _slots(model):
        canonical = aliases.get(name, name)
        if canonical not in stored:
            missing.append(name)
            continue
        used.add(canonical)
        shape, dtype = stored[canonical]
        if tuple(shape) != tuple(current.shape):
            wrong_shape.append(f"{name}: file {tuple(shape)}, model {tuple(current.shape)}")
        elif _kind(dtype) != _kind(current.dtype):
            wrong_kind.append(f"{canonical}: file {dtype}, model {current.dtype}")
        elif is_param:
            parameters[canonical] = dtype
    unused = sorted(set(stored) - used)
    if missing or wrong_shape or unused:
        raise CheckpointMismatchError(_mismatch(where, missing, unused, wrong_shape))
    if wrong_kind:
        raise CheckpointDtypeError(f"{where}: {len(wrong_kind)} tensor(s) hold another kind of number than the "
                                   f"model: {', '.join(wrong_kind[:6])}. The file was altered or damaged; "
                                   "restore it or save the model again.")
    _check_float_types(parameters, where)


def _kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating point"
    return "bool" if dtype == torch.bool else "integer"


def _check_float_types(parameters: Mapping[str, torch.dtype], where: str) -> None:
    counts: dict[torch.dtype, int] = {}
    for dtype in parameters.values():
        if dtype.is_floating_point:
            counts[dtype] = counts.get(dtype, 0) + 1
    if not counts:
        return
    main = max(counts, key=counts.get)
    foreign = [f"{name} ({dtype})" for name, dtype in parameters.items()
               if dtype.is_floating_point and dtype not in (main, torch.float32)]
    if foreign:
        raise CheckpointDtypeError(
            f"{where}: the parameters are {main}, but {len(foreign)} are stored in another floating-point "
            f"type: {', '.join(foreign[:6])}. The model could not compute with them; the file was altered "
            "or damaged: restore it or save the model again.")


def _mismatch(where: str, missing: list[str], unexpected: list[str], wrong_shape: list[str]) -> str:
    lines = [f"{where}: the weights do not fit the model."]
    for label, names in (("missing from the file", missing), ("in the file but not in the model", unexpected),
                         ("of another shape", wrong_shape)):
        if names:
            more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
            lines.append(f"  {len(names)} tensor(s) {label}: {', '.join(names[:8])}{more}")
    return "\n".join(lines)


def check_tensor_names(where: str, expected: Mapping[str, tuple[int, ...]],
                       found: Mapping[str, tuple[int, ...]], hint: str) -> None:
    """Raise CheckpointMismatchError when `found` (name -> shape) differs from `expected`."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{n}: file {tuple(found[n])}, expected {tuple(expected[n])}"
             for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(_mismatch(where, missing, unexpected, wrong) + "\n" + hint)
