"""Sharded checkpoints of a parallelized model with `torch.distributed.checkpoint` (DCP), and
loading them back: into a parallelized model (resume training on any number of ranks), or into
one process as an ordinary upcycled model (serve, export, `upcycle_fx.save`).

Layout of a directory written by `save_sharded`:
* DCP files (`.metadata`, `__<rank>_0.distcp`): under `model.` every tensor of the model's
  tensor table (`exporters/state.py`: parameters, persistent and non-persistent buffers, tied
  weights once), each rank writing its own shards (FSDP shards, expert-parallel shards,
  replicated buffers once); under `optim.` the optimizer state when one is given;
* `upcycle_fx.json`: the native manifest (which FFNs became MoE layers, settings, the dense
  model's class and config), the same file `upcycle_fx.save` writes, so `consolidate` rebuilds
  the model exactly as `upcycle_fx.load` does.
DCP reshards on load, so a checkpoint written on 64 GPUs loads on 8, or in one process.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule

from ..exporters.checkpoint import _hf_skeleton
from ..exporters.errors import CheckpointError
from ..exporters.manifest import describe, read_manifest, rebuild, write_manifest
from ..exporters.state import assign_state, tensor_table

MODEL_KEY, OPTIM_KEY = "model", "optim"


def _resharded(model: nn.Module) -> None:
    """Put every FSDP unit in its sharded state (the root stays gathered after a forward)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def _original_class(model: nn.Module) -> Iterator[None]:
    """FSDP2 swaps the root's class for a generated `FSDP<Class>`; the manifest must record the
    model's own class (and, for transformers models, find its config), so put it back meanwhile."""
    fsdp_class = type(model)
    if isinstance(model, FSDPModule):
        model.__class__ = next(c for c in fsdp_class.__mro__[1:] if not issubclass(c, FSDPModule))
    try:
        yield
    finally:
        model.__class__ = fsdp_class


def save_sharded(model: nn.Module, directory: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write the parallelized `model` (and `optimizer`'s state) to `directory` with DCP.
    Collective: every rank calls it; each writes its shards, rank 0 also the manifest."""
    directory = Path(directory)
    _resharded(model)
    table = tensor_table(model)
    state: dict[str, Any] = {MODEL_KEY: dict(table.tensors)}
    if optimizer is not None:
        state[OPTIM_KEY] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=directory)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with _original_class(model):
            write_manifest(describe(model, table), directory)
    if dist.is_initialized():
        dist.barrier()
    return directory


def load_sharded(model: nn.Module, directory: str | os.PathLike, *,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a `save_sharded` checkpoint into the parallelized `model` (and `optimizer`), in
    place, whatever the number of ranks that wrote it. Collective."""
    directory = Path(directory)
    _resharded(model)
    state: dict[str, Any] = {MODEL_KEY: dict(tensor_table(model).tensors)}
    if optimizer is not None:
        state[OPTIM_KEY] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=directory)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state[OPTIM_KEY])


def consolidate(directory: str | os.PathLike, skeleton: nn.Module | None = None, *,
                example_inputs: Any = None, leaf_modules=()) -> nn.Module:
    """The model of a `save_sharded` checkpoint as one ordinary (single-process, CPU) upcycled
    model, which `upcycle_fx.save` can write and `upcycle_fx.export_onnx` export.

    `skeleton`: the dense model it was upcycled from (structure only), not needed for Hugging
    Face models (rebuilt from the recorded config), as for `upcycle_fx.load`. Runs in one
    process even inside a distributed job (it reads every shard itself).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    metadata = dcp.FileSystemReader(directory).read_metadata()
    prefix = MODEL_KEY + "."
    tensors: dict[str, torch.Tensor] = {}
    for key, item in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and hasattr(item, "size"):
            tensors[key[len(prefix):]] = torch.empty(item.size, dtype=item.properties.dtype)
    if not tensors:
        raise CheckpointError(f"{directory}: no model tensors in this DCP checkpoint; was it written by "
                              "upcycle_fx.distributed.save_sharded?")
    with warnings.catch_warnings():  # DCP warns that it loads in one process: that is the point
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({MODEL_KEY: tensors}, checkpoint_id=directory, no_dist=True)
    if skeleton is None:
        model = rebuild(manifest, _hf_skeleton(manifest, directory), example_inputs=example_inputs,
                        leaf_modules=leaf_modules, inplace=True)
    else:
        model = rebuild(manifest, skeleton, example_inputs=example_inputs, leaf_modules=leaf_modules)
    assign_state(model, tensors, manifest.aliases, where=str(directory))
    return model
