"""Checks of output arguments, made before any model is loaded or any file is written.

No command may delete, overwrite or write into the user's input: an output directory that is the
input, lies inside it, or contains it is refused, whatever `--overwrite` says.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UnsafeOutputError, UsageError


def check_output_directory(source: Path, out: str | os.PathLike) -> Path:
    """`out` as a path, refused when writing it could touch `source` or cannot be a directory."""
    out = Path(out)
    src, dst = source.resolve(), out.resolve()
    if dst == src:
        raise UnsafeOutputError(f"--out {out} is the input model directory: writing there would "
                                "replace the input; choose a new directory")
    if src in dst.parents:
        raise UnsafeOutputError(f"--out {out} lies inside the input model directory {source}; "
                                "choose a directory outside it")
    if dst in src.parents:
        raise UnsafeOutputError(f"--out {out} contains the input model directory {source}; "
                                "choose a new directory that does not hold the input")
    if out.exists() and not out.is_dir():
        raise UnsafeOutputError(f"--out {out} is a file; give a new or empty directory")
    _check_parents(out)
    return out


def check_onnx_output(source: Path, out: str | os.PathLike, overwrite: bool) -> Path:
    """The ONNX file `out`: not a directory, not an existing file (unless `overwrite`), and never
    one of the input model's own files."""
    path = Path(out)
    if path.is_dir() or str(out).endswith(("/", os.sep)):
        hint = (" (it holds a model: did you forget OUT.onnx? usage: upcycle-fx export-onnx [MODEL] "
                "OUT.onnx)" if (path / "config.json").exists() else "")
        raise UsageError(f"OUT.onnx {out} is a directory{hint}; give the file to write, e.g. "
                         f"{path / 'model.onnx'}")
    if path.exists():
        if source.resolve() in path.resolve().parents and path.suffix != ".onnx":
            raise UnsafeOutputError(f"{out} is a file of the input model; choose another output file")
        if not overwrite:
            raise UnsafeOutputError(f"{out} exists; choose a new file, or pass --overwrite to "
                                    "replace it once the new one is complete")
    _check_parents(path)
    return path


def _check_parents(path: Path) -> None:
    blocking = next((p for p in path.absolute().parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise UnsafeOutputError(f"{blocking} is a file, so {path} cannot be created; choose "
                                "another output path")


def shard_size(text: str | None) -> int | None:
    """--max-shard-size in bytes ("2GB", "500MB", 1000000), or None; UsageError otherwise."""
    if text is None:
        return None
    from ..exporters.shards import parse_size

    value = int(text) if text.isdigit() else None
    if value is None:
        try:
            value = parse_size(text)
        except ValueError:
            value = None
    if value is None or value <= 0:
        raise UsageError(f"--max-shard-size {text!r} is not a size; give bytes or a number with a "
                         "unit, e.g. 2GB, 500MB, 1000000")
    return value
