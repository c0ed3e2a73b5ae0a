"""Sharded safetensors checkpoints: reading one tensor group at a time, writing to a shard plan.

Reading: `CheckpointReader` resolves `model.safetensors` or `model.safetensors.index.json`,
checks every shard before anything is converted (an index of another structure, missing file,
truncated file, index that names tensors a shard lacks) and reads tensors by name, opening a shard only for the duration of one
read so that its memory map does not stay resident.

Writing: `ShardWriter` is given the whole list of output tensors (name, shape, dtype) first, so
shard file names and sizes are fixed before any data exists; tensors are then added in that
order and each shard is written as soon as its last tensor arrives. At most one shard's tensors
are held at a time. One file and no index for a single shard, Hugging Face naming otherwise.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .atomic import write_error
from .errors import (CheckpointDtypeError, CheckpointError, CheckpointMismatchError, CheckpointWriteError,
                     ManifestError, MissingShardError, ShardSizeError, TruncatedShardError)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"

# safetensors header dtype strings (https://github.com/huggingface/safetensors, format spec)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class TensorInfo:
    """Where a stored tensor is and what it is, from the shard header alone."""

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError as error:  # pragma: no cover - safetensors ships with the [hf] extra
        raise CheckpointError("checkpoints need the safetensors package: pip install safetensors "
                              "(or upcycle_fx[hf])") from error
    return safetensors


def read_index(path: Path) -> dict[str, str]:
    """The weight map of a safetensors index (`{"weight_map": {tensor: shard file}}`), checked:
    a ManifestError names what is wrong (not JSON, another structure, a shard outside the
    directory)."""
    def damaged(problem: str) -> ManifestError:
        return ManifestError(f"{path}: {problem}, so it is not a safetensors index; restore it from "
                             "the original checkpoint (or save the model again).")

    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise damaged(f"not valid JSON ({error})") from error
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        found = json.dumps(data)[:60] if not isinstance(data, dict) else f"keys {sorted(data)[:5]}"
        raise damaged(f'the top level must be an object with a "weight_map" object; found {found}')
    weight_map = data["weight_map"]
    bad = [f"{name!r}: {file!r}" for name, file in weight_map.items()
           if not isinstance(file, str) or not file.endswith(".safetensors") or Path(file).name != file]
    if bad:
        raise damaged(f"weight_map entries must name .safetensors files in the same directory; "
                      f"found {', '.join(bad[:3])}")
    if not weight_map:
        raise damaged("weight_map is empty")
    return weight_map


class CheckpointReader:
    """The safetensors weights of one directory, validated up front."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self._read_header(file)
        self._check_index()

    # ---- discovery and validation
    def _shard_files(self) -> list[str]:
        index = self.directory / SAFE_INDEX
        if index.is_file():
            self.weight_map: dict[str, str] | None = read_index(index)
            files = sorted(set(self.weight_map.values()))
            absent = [f for f in files if not (self.directory / f).is_file()]
            if absent:
                raise MissingShardError(
                    f"{self.directory}: {len(absent)} of {len(files)} shard(s) named in {SAFE_INDEX} "
                    f"are missing: {', '.join(absent)}. Copy or download them again.")
            return files
        self.weight_map = None
        if (self.directory / SAFE_WEIGHTS).is_file():
            return [SAFE_WEIGHTS]
        found = sorted(p.name for p in self.directory.glob("*.safetensors"))
        hint = (f" Found {', '.join(found[:4])} but no {SAFE_INDEX} to say which tensors they hold."
                if found else "")
        raise MissingShardError(f"{self.directory}: no {SAFE_WEIGHTS} and no {SAFE_INDEX}.{hint} "
                                "Save the model with save_pretrained(..., safe_serialization=True).")

    def _read_header(self, file: str) -> None:
        safetensors = _safetensors()
        path = self.directory / file
        try:
            with safetensors.safe_open(str(path), framework="pt") as handle:
                for name in handle.keys():
                    sliced = handle.get_slice(name)
                    dtype = _DTYPES.get(sliced.get_dtype())
                    if dtype is None:
                        raise CheckpointDtypeError(f"{path}: tensor {name} has dtype {sliced.get_dtype()}, "
                                                   "which upcycle_fx does not convert.")
                    self.tensors[name] = TensorInfo(file, tuple(sliced.get_shape()), dtype)
        except OSError as error:
            raise CheckpointError(f"cannot read {path}: {error}; check that the file is readable.") from error
        except safetensors.SafetensorError as error:
            raise TruncatedShardError(
                f"{path} ({path.stat().st_size:,} bytes) is not a complete safetensors file: {error}. "
                "It was probably cut short while copying or downloading; fetch it again.") from error

    def _check_index(self) -> None:
        if self.weight_map is None:
            return
        wrong = [f"{name} (index: {file}, found in: {self.tensors[name].file if name in self.tensors else 'none'})"
                 for name, file in self.weight_map.items()
                 if name not in self.tensors or self.tensors[name].file != file]
        if wrong:
            raise CheckpointMismatchError(
                f"{self.directory / SAFE_INDEX} does not match its shards for {len(wrong)} tensor(s): "
                f"{', '.join(wrong[:5])}. The index or a shard belongs to another checkpoint.")

    # ---- facts
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    @property
    def largest_shard_bytes(self) -> int:
        return max((self.directory / f).stat().st_size for f in self.files)

    @property
    def total_bytes(self) -> int:
        return sum((self.directory / f).stat().st_size for f in self.files)

    # ---- data
    def read(self, names: Iterable[str], *, aligned: bool = False) -> dict[str, torch.Tensor]:
        """The named tensors, as tensors of their own (the shard is closed again afterwards).

        safetensors returns tensors at their offset in the file, often not 64-byte aligned; CPU
        kernels then take other code paths and round differently in the last bit. `aligned`
        copies each into a fresh allocation, for tensors a model will compute with.
        """
        safetensors = _safetensors()
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, group in by_file.items():
            with safetensors.safe_open(str(self.directory / file), framework="pt") as handle:
                for name in group:
                    tensor = handle.get_tensor(name)
                    out[name] = tensor.clone() if aligned else tensor
        return out


# --------------------------------------------------------------------------- writing


class Progress:
    """Progress callbacks of a checkpoint write; the default does nothing."""

    def start(self, tensors: int, shards: int, nbytes: int) -> None:
        pass

    def tensor(self, name: str, nbytes: int) -> None:
        pass

    def shard(self, filename: str) -> None:
        pass


def plan_shards(groups: Sequence[Sequence[tuple[str, int]]], max_bytes: int) -> list[list[str]]:
    """Split groups of (name, nbytes), in order, into shards of at most `max_bytes`.

    A group (one MoE layer's tensors) that does not fit in the current shard starts a new one, so
    the shard before it is complete, and written, before the group's tensors are produced. A group
    larger than `max_bytes` is split at tensor boundaries and its last shard closed with it, so
    that no part of it (a view keeps all of the layer's memory alive) waits for later tensors.
    A single tensor larger than `max_bytes` gets a shard of its own.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(n for _, n in group)
        if shards[-1] and size + group_bytes > max_bytes:
            shards.append([])
            size = 0
        for name, nbytes in group:
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        if group_bytes > max_bytes:
            shards.append([])
            size = 0
    return [shard for shard in shards if shard]


def parse_size(size: int | str) -> int:
    """Bytes from a positive int or a string such as "2GB" / "500MB" / "4GiB" (units as
    transformers reads them); anything else is a ShardSizeError."""
    usage = ('give max_shard_size as a positive number of bytes or a string such as "2GB", "500MB" '
             'or "4GiB" (a whole number and a unit)')
    if isinstance(size, str):
        try:
            from transformers.utils.hub import convert_file_size_to_int

            value = convert_file_size_to_int(size.strip())
        except ImportError as error:
            raise ShardSizeError(f"max_shard_size={size!r}: reading units needs transformers; "
                                 "give a number of bytes instead.") from error
        except (ValueError, TypeError) as error:
            raise ShardSizeError(f"max_shard_size={size!r} is not a size; {usage}.") from error
    elif isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        raise ShardSizeError(f"max_shard_size={size!r} ({type(size).__name__}) is not a size; {usage}.")
    if value <= 0:
        raise ShardSizeError(f"max_shard_size={size!r} is {value} bytes; {usage}.")
    return value


class ShardWriter:
    """Writes tensors, in the announced order, into shards planned from their sizes.

    `groups`: the output tensors as (name, shape, dtype), in groups produced together (see
    `plan_shards`).
    """

    def __init__(self, directory: Path, groups: Sequence[Sequence[tuple[str, tuple[int, ...], torch.dtype]]],
                 max_shard_bytes: int, progress: Progress | None = None,
                 metadata: Mapping[str, str] | None = None) -> None:
        self.directory = directory
        entries = [entry for group in groups for entry in group]
        self.expected = {name: (tuple(shape), dtype) for name, shape, dtype in entries}
        if len(self.expected) != len(entries):
            raise CheckpointError("two output tensors have the same name; this is a bug in upcycle_fx")
        sizes = [[(name, _numel(shape) * dtype.itemsize) for name, shape, dtype in group] for group in groups]
        self.total_bytes = sum(n for group in sizes for _, n in group)
        self.plan = plan_shards(sizes, max_shard_bytes)
        count = len(self.plan)
        self.filenames = [SAFE_WEIGHTS] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self.shard_of = {name: i for i, names in enumerate(self.plan) for name in names}
        self.pending: dict[int, dict[str, torch.Tensor]] = {}
        self.added: set[str] = set()
        self.metadata = {"format": "pt", **(metadata or {})}
        self.progress = progress or Progress()
        _check_free_space(directory, self.total_bytes)
        self.progress.start(len(self.expected), count, self.total_bytes)

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            shape, dtype = self.expected.get(name, (None, None))
            if shape is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise CheckpointError(f"output tensor {name} {tuple(tensor.shape)} {tensor.dtype} was not "
                                      f"planned as such ({shape}, {dtype}); this is a bug in upcycle_fx")
            index = self.shard_of[name]
            self.added.add(name)
            self.pending.setdefault(index, {})[name] = tensor
            self.progress.tensor(name, tensor.numel() * tensor.element_size())
            if len(self.pending[index]) == len(self.plan[index]):
                self._flush(index)

    def _flush(self, index: int) -> None:
        tensors = self.pending.pop(index)
        ordered = {name: tensors[name].contiguous() for name in self.plan[index]}
        path = self.directory / self.filenames[index]
        safetensors = _safetensors()
        try:
            safetensors.torch.save_file(ordered, str(path), metadata=self.metadata)
        except (OSError, safetensors.SafetensorError) as error:
            raise write_error(error, path) from error
        self.progress.shard(self.filenames[index])

    def close(self) -> None:
        """Check that every planned tensor arrived and write the index (for several shards)."""
        missing = [name for name in self.expected if name not in self.added]
        if missing:
            raise CheckpointError(f"{len(missing)} planned output tensor(s) were never produced "
                                  f"({', '.join(missing[:5])}); this is a bug in upcycle_fx")
        if len(self.plan) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.filenames[i] for name, i in self.shard_of.items()}}
            path = self.directory / SAFE_INDEX
            try:
                path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            except OSError as error:
                raise write_error(error, path) from error


def _check_free_space(directory: Path, nbytes: int) -> None:
    """CheckpointWriteError before anything is written when the disk cannot hold `nbytes` more."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:  # a file system that does not say: find out by writing
        return
    if free < nbytes:
        raise CheckpointWriteError(
            errno.ENOSPC, f"{directory.parent} has {free:,} bytes free and the checkpoint needs {nbytes:,}; free "
            "space there or write to another disk. Nothing was written.")
