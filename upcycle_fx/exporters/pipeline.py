"""The one write path of every checkpoint: units of tensors -> output format -> planned shards.

An upcycled model's tensors are grouped into units (one MoE layer's tensors together, every
other tensor alone). A *source* produces a unit's tensors (from a model in memory, or streamed
from an input checkpoint) and can describe them without data (meta tensors of the right shape
and dtype); an output *format* renames / reshapes a unit into the tensors it stores (native:
as is; Hugging Face: stock names and layouts). The plan is made on meta tensors first, so shard
names and sizes are fixed before any data is produced; then units are produced one at a time,
written as their shards fill, and dropped. Everything happens in a staging directory that only
becomes the output once complete (`atomic.py`).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import torch
from torch import nn

from ..moe import MoE
from ..report import moe_layers
from .atomic import atomic_directory
from .errors import CheckpointError
from .shards import Progress, ShardWriter
from .state import TensorTable


@dataclass(frozen=True)
class Unit:
    """Tensors (canonical names in the upcycled model) produced and converted together."""

    names: tuple[str, ...]
    moe: str | None = None          # the MoE layer's module path, for an MoE unit
    non_persistent: bool = False    # a buffer outside state_dict() (rotary tables, position ids)


def units_of(model: nn.Module, table: TensorTable) -> list[Unit]:
    """The model's tensors as units, in module order (an MoE unit where its first tensor is)."""
    hosts = [path for path, _ in moe_layers(model)]
    non_persistent = set(table.non_persistent)
    groups: dict[str, list[str]] = {}
    units: list[Unit | str] = []
    for name in table.tensors:
        host = next((h for h in hosts if name.startswith(f"{h}.") or not h), None)
        if host is None:
            units.append(Unit((name,), non_persistent=name in non_persistent))
            continue
        if host not in groups:
            groups[host] = []
            units.append(host)
        groups[host].append(name)
    return [Unit(tuple(groups[u]), moe=u) if isinstance(u, str) else u for u in units]


class TensorSource(Protocol):
    def meta(self, unit: Unit) -> dict[str, torch.Tensor]:
        """The unit's tensors as meta tensors (shape and dtype, no data)."""

    def tensors(self, unit: Unit) -> dict[str, torch.Tensor]:
        """The unit's tensors with their data."""


class OutputFormat(Protocol):
    def convert(self, unit: Unit, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors to store for `unit` (works on meta tensors too)."""

    def write_files(self, directory: Path) -> None:
        """Config / manifest files of the output."""

    def check(self, directory: Path) -> None:
        """A last check of the complete staging directory before it becomes the output."""


def output_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A `dtype=` argument as a floating torch dtype ("bfloat16", torch.float16, ...); None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise CheckpointError(f"dtype={dtype!r} is not a floating torch dtype; use e.g. bfloat16, "
                              "float16 or float32.")
    return value


class ModelSource:
    """Tensors of a model in memory, read from its tensor table; floating ones cast to `dtype`
    (None: as they are), one unit at a time."""

    def __init__(self, table: TensorTable, dtype: torch.dtype | None = None) -> None:
        self.table, self.dtype = table, dtype

    def tensors(self, unit: Unit) -> dict[str, torch.Tensor]:
        return {name: self.table.tensors[name].detach().to(self._dtype(name)) for name in unit.names}

    def _dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor `name`: `dtype` for floating tensors, except those an MoE
        layer keeps in float32 whatever the model's dtype."""
        tensor = self.table.tensors[name]
        if (self.dtype is None or not tensor.is_floating_point()
                or name.rpartition(".")[2] in MoE.FLOAT32_TENSORS):
            return tensor.dtype
        return self.dtype

    def meta(self, unit: Unit) -> dict[str, torch.Tensor]:
        return {name: torch.empty(self.table.tensors[name].shape, dtype=self._dtype(name), device="meta")
                for name in unit.names}


@dataclass(frozen=True)
class Written:
    """What `write_checkpoint` wrote."""

    path: Path
    shards: tuple[str, ...]
    tensors: int
    nbytes: int


WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.bin.index.json",
                "*.pt", "*.pth", "*.ckpt", "*.gguf", "config.json", "upcycle_fx.json")


def auxiliary_files(directory: str | os.PathLike) -> list[Path]:
    """Files of an input model directory that travel with the output unchanged (tokenizer,
    generation config, README): every top-level file that is not weights or a model config."""
    directory = Path(directory)
    skip = {p for pattern in WEIGHT_FILES for p in directory.glob(pattern)}
    return sorted(p for p in directory.iterdir() if p.is_file() and p not in skip)


def write_checkpoint(directory: str | os.PathLike, units: list[Unit], source: TensorSource,
                     fmt: OutputFormat, *, max_shard_bytes: int, overwrite: bool = False,
                     progress: Progress | None = None, extra_files: Sequence[Path] = (),
                     protect: Sequence[str | os.PathLike] = ()) -> Written:
    """Write `units` from `source` in format `fmt` into `directory`, atomically; `extra_files`
    are copied alongside. An output that is, holds or lies inside a `protect`ed path (the input
    checkpoint) is refused before any work."""
    groups = [[(name, tuple(t.shape), t.dtype) for name, t in fmt.convert(unit, source.meta(unit)).items()]
              for unit in units]
    with atomic_directory(directory, overwrite=overwrite, protect=protect) as staging:
        for path in extra_files:
            shutil.copy2(path, staging / path.name)
        fmt.write_files(staging)
        writer = ShardWriter(staging, groups, max_shard_bytes, progress)
        for unit in units:
            writer.add(fmt.convert(unit, source.tensors(unit)))
        writer.close()
        fmt.check(staging)
    return Written(Path(directory), tuple(writer.filenames), len(writer.expected), writer.total_bytes)
