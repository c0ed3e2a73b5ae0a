"""Atomic output directories: a checkpoint appears complete or not at all.

Everything is written into a hidden temporary directory beside the target and moved into place
with one rename at the end, so an interrupted or failed conversion never leaves a directory that
looks like a finished model. An existing model is never overwritten unless asked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError

MODEL_FILES = ("config.json", "upcycle_fx.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json")


def holds_model(directory: Path) -> bool:
    """Whether `directory` already contains model files (a config, a manifest or weights)."""
    return any((directory / name).exists() for name in MODEL_FILES) or any(directory.glob("*.safetensors"))


def _check_target(target: Path, overwrite: bool) -> None:
    if not target.exists():
        return
    if not target.is_dir():
        raise OutputExistsError(f"{target} exists and is a file; choose a directory path for the output.")
    if holds_model(target):
        if not overwrite:
            raise OutputExistsError(
                f"{target} already holds a model; choose a new directory, or pass overwrite=True "
                "(--overwrite) to replace it once the new one is complete.")
    elif any(target.iterdir()):
        raise OutputExistsError(
            f"{target} is not empty ({', '.join(sorted(p.name for p in target.iterdir())[:5])}); "
            "write the model into a new or empty directory.")


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory next to `target`; on success it becomes `target`.

    On any error the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target).absolute()
    _check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        _move_into_place(staging, target, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    _check_target(target, overwrite)  # someone may have written there meanwhile
    if not target.exists():
        os.replace(staging, target)
        return
    if not any(target.iterdir()):
        target.rmdir()
        os.replace(staging, target)
        return
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
