"""Atomic output directories: a checkpoint appears complete or not at all, and a model being
replaced is never lost.

Everything is written into a hidden staging directory beside the target
(`.NAME.partial-PID-RANDOM`) and moved into place at the end. Replacing a model
(`overwrite=True`) swaps the two directories in one system call where the OS has one (Linux
`renameat2(RENAME_EXCHANGE)`), so the target holds a complete model at every instant;
elsewhere the old model is renamed aside (`.NAME.old-PID-RANDOM`) and put back if the second
rename fails. While writing, SIGTERM raises `TerminatedDuringWriteError` instead of ending the
process on the spot, so the staging directory is removed as on any error; SIGINT and SIGTERM
wait during the swap. A process killed outright (SIGKILL, power loss) leaves its hidden
directories behind: the next write to the same target removes them, and puts back a model a
killed swap had moved aside, with a `LeftoverOutputWarning` (`recover`); `load` names such a
model.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import shutil
import signal
import threading
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import (CheckpointError, CheckpointWriteError, InterruptedReplaceError, LeftoverOutputWarning,
                     OutputExistsError, OutputOverlapsInputError, TerminatedDuringWriteError)

MODEL_FILES = ("config.json", "upcycle_fx.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json")
STAGING, ASIDE = "partial", "old"  # kinds of hidden directory beside a target


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


def refuse_overlap(target: Path, protect: Iterable[str | os.PathLike]) -> None:
    """OutputOverlapsInputError if `target` is a protected path, lies inside one or contains one
    (writing there could replace or swallow the input being read)."""
    out = Path(target).resolve()
    for path in protect:
        kept = Path(path).resolve()
        if out == kept or kept in out.parents or out in kept.parents:
            relation = "is" if out == kept else "is inside" if kept in out.parents else "contains"
            raise OutputOverlapsInputError(
                f"the output {target} {relation} the input {path}; write the output to a separate "
                "directory (the input is read while the output is written and must stay intact).")


# --------------------------------------------------------------------------- leftovers


@dataclass(frozen=True)
class Leftover:
    """A hidden directory beside a target, written by a process that may still be running."""

    path: Path
    kind: str          # STAGING (a write in progress) or ASIDE (a model being replaced)
    pid: int | None    # the writer, when the name records it

    @property
    def stale(self) -> bool:
        """Its writer is gone (a killed process), so nothing will finish or remove it."""
        return self.pid is None or not _alive(self.pid)


def _alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no harmless liveness probe: treat as running, never remove
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, OSError):
        return False
    return True


def _hidden(target: Path, kind: str) -> Path:
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def leftovers(target: Path) -> list[Leftover]:
    """Hidden staging / set-aside directories of `target` (running writers' included)."""
    found = []
    for kind in (STAGING, ASIDE):
        prefix = f".{target.name}.{kind}-"
        for path in target.parent.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix):].partition("-")[0]
            pid = int(pid_text) if pid_text.isdigit() else None  # names of older versions lack it
            if path.is_dir():
                found.append(Leftover(path, kind, pid))
    return sorted(found, key=lambda left: left.path.stat().st_mtime, reverse=True)


def interrupted_replacement(target: Path) -> Path | None:
    """The complete previous model of `target` that a killed swap left aside, if `target` lacks
    a model; None otherwise."""
    if target.exists() and (not target.is_dir() or holds_model(target)):
        return None
    return next((left.path for left in leftovers(target)
                 if left.kind == ASIDE and left.stale and holds_model(left.path)), None)


def recover(target: str | os.PathLike) -> list[str]:
    """Clean up after writers of `target` that were killed: put back a model a killed swap had
    moved aside (when `target` has none), remove every other stale hidden directory. Returns
    what was done, one sentence each; directories of running writers are left alone."""
    target = Path(target).absolute()
    done = []
    aside = interrupted_replacement(target)
    if aside is not None:
        if target.is_dir():
            target.rmdir()  # empty: interrupted_replacement checked
        os.replace(aside, target)
        done.append(f"put back the model at {target}, which a killed process had moved to {aside.name} "
                    "while replacing it")
    for left in leftovers(target):
        if left.stale:
            shutil.rmtree(left.path, ignore_errors=True)
            what = "an unfinished write" if left.kind == STAGING else "a model it was replacing"
            done.append(f"removed {left.path.name}, {what} left beside {target} by a killed process")
    return done


# --------------------------------------------------------------------------- signals


class WriteGuard:
    """SIGTERM as an exception while a write runs; SIGINT and SIGTERM deferred in `deferred()`."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.deferring = False
        self.completed = False  # the output is in place
        self.pending: list[int] = []
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.deferring:
            self.pending.append(signum)
        elif signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        elif self.completed:
            raise TerminatedDuringWriteError(
                f"received SIGTERM as the write of {self.target} finished; the output there is complete.")
        else:
            raise TerminatedDuringWriteError(
                f"received SIGTERM while writing {self.target}; the unfinished output was removed and "
                f"whatever was at {self.target} before is untouched. Run the write again to produce it.")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Run the block without being split by SIGINT / SIGTERM; they act when it is done."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
            if self.pending:
                signum = self.pending[0]
                self.pending.clear()
                self._handle(signum, None)


@contextlib.contextmanager
def terminate_raises(target: str | os.PathLike) -> Iterator[WriteGuard]:
    """While writing `target`: SIGTERM raises `TerminatedDuringWriteError` (so `finally` blocks
    and cleanup run) instead of ending the process at once; inside `guard.deferred()` SIGINT and
    SIGTERM wait for the block to finish. Handlers are installed only from the main thread and
    only over the defaults (a handler of the caller's stays in charge); the previous handlers
    are restored on exit."""
    guard = WriteGuard(Path(target))
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    for signum, default in defaults.items():
        if signal.getsignal(signum) is default:
            guard.previous[signum] = signal.signal(signum, guard._handle)
    try:
        yield guard
    finally:
        for signum, handler in guard.previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------- write errors


def write_error(error: BaseException, path: Path) -> CheckpointWriteError:
    """A CheckpointWriteError for a failed write of `path` that says what to do about it."""
    code = getattr(error, "errno", None)
    text = getattr(error, "strerror", None) or str(error)
    if code in (errno.ENOSPC, errno.EDQUOT) or "StorageFull" in str(error) or "No space left" in str(error):
        advice = "the disk is full: free space there or write to another disk"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = "no permission to write there: choose a writable directory"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        advice = "a parent of the output is a file: choose a path whose parents are directories"
    else:
        advice = "check the file system, then write again"
    return CheckpointWriteError(code if code is not None else errno.EIO,
                                f"cannot write {path} ({text}); {advice}. The unfinished output is "
                                "removed and an existing model there is left as it was.")


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def _inside(error: OSError, directory: Path) -> bool:
    """Whether `error` came from writing into `directory`: it names a file there, or names no
    file and is one of the errors only writing gives (a full disk, a read-only file system)."""
    names = [n for n in (error.filename, error.filename2) if n is not None]
    if not names:
        return error.errno in WRITE_ERRNOS
    return any(Path(os.fsdecode(n)).absolute().is_relative_to(directory) for n in names)


def _make_staging(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = _hidden(target, STAGING)
        staging.mkdir()
    except OSError as error:
        raise write_error(error, target) from error
    return staging


def _make_readable(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)


# --------------------------------------------------------------------------- the directory


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False,
                     protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a staging directory next to `target`; on success it becomes `target`.

    Refused before any work: a target that is, is inside or contains a `protect`ed path
    (`OutputOverlapsInputError`), one that holds a model without `overwrite` or other files
    (`OutputExistsError`), one that cannot be created (`CheckpointWriteError`). Hidden
    directories of killed earlier writers are cleaned up first (`recover`, with a warning). On
    any error, SIGTERM included, the staging directory is removed and `target` is left as it
    was; failed writes inside the staging directory become `CheckpointWriteError`.
    """
    target = Path(target).absolute()
    refuse_overlap(target, protect)
    for sentence in recover(target):
        warnings.warn(f"{sentence}.", LeftoverOutputWarning, stacklevel=3)
    _check_target(target, overwrite)
    staging = _make_staging(target)
    with terminate_raises(target) as guard:
        try:
            yield staging
            with guard.deferred():
                _make_readable(staging)
                try:
                    _move_into_place(staging, target, overwrite)
                except OSError as error:
                    if isinstance(error, CheckpointError):
                        raise
                    raise write_error(error, target) from error
                guard.completed = True
        except BaseException as error:
            with guard.deferred():
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError) and not isinstance(error, CheckpointError) and _inside(error, staging):
                raise write_error(error, target) from error
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
    if exchange(staging, target):  # the new model at target, the old one at staging: remove it
        shutil.rmtree(staging, ignore_errors=True)
        return
    aside = _hidden(target, ASIDE)
    os.replace(target, aside)
    try:
        os.replace(staging, target)
    except BaseException as error:
        try:
            os.replace(aside, target)
        except OSError:
            raise InterruptedReplaceError(
                f"moving the new model to {target} failed ({error}) and so did putting the previous "
                f"one back; it is intact in {aside}: rename it to {target}, or call "
                f"upcycle_fx.exporters.atomic.recover({str(target)!r}).") from error
        raise
    shutil.rmtree(aside, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.lru_cache(maxsize=1)
def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):  # not Linux / glibc < 2.28
        return None


def exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE). False where the OS or
    the file system cannot; nothing has moved then."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
