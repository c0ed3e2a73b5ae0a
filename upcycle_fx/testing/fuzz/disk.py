"""Disk faults and bad arguments on `upcycle_fx.save` (and `load`).

Faults are injected by patching the calls the writer makes (`os.replace`, safetensors'
`save_file`, `Path.write_text`, `tempfile.mkdtemp`): the tests run as root, for whom a read-only
directory is writable, so chmod cannot stand in for a read-only or full disk. After each fault:
the error must be named (an interrupt may propagate as itself), the target must hold the old
model intact (or the new one, complete), and no hidden staging directory may be left behind.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from hypothesis import strategies as st

from .checkpoints import SMALL_SHARDS, loaded_matches, saved_model
from .models import ModelSpec
from .oracle import Category, Outcome, classify_exception

NAN = float("nan")


class _Countdown:
    """Wrap `function` so that its `fail_on`-th call (1-based) raises `error` instead."""

    def __init__(self, function, fail_on: int, error: BaseException, partial_write: bool = False) -> None:
        self.function, self.fail_on, self.error, self.partial = function, fail_on, error, partial_write
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            if self.partial:  # a full disk: part of the file is there, then ENOSPC
                Path(str(args[1] if len(args) > 1 else args[0])).write_bytes(b"\0" * 64)
            raise self.error
        return self.function(*args, **kwargs)

    def __get__(self, instance, owner=None):
        """Bind like a function when patched in as a method (`Path.write_text`)."""
        return self if instance is None else functools.partial(self, instance)


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fault_patches(fault: str) -> list:
    """The patches that inject `fault` into the writer."""
    import safetensors.torch

    if fault == "rename_fails_first":
        return [mock.patch("os.replace", _Countdown(os.replace, 1, OSError(errno.EIO, "I/O error")))]
    if fault == "rename_fails_second":
        return [mock.patch("os.replace", _Countdown(os.replace, 2, OSError(errno.EIO, "I/O error")))]
    if fault in ("disk_full_first_shard", "disk_full_second_shard"):
        n = 1 if fault == "disk_full_first_shard" else 2
        return [mock.patch.object(safetensors.torch, "save_file",
                                  _Countdown(safetensors.torch.save_file, n, _enospc(), partial_write=True))]
    if fault == "disk_full_manifest":
        return [mock.patch.object(Path, "write_text", _Countdown(Path.write_text, 1, _enospc()))]
    if fault == "interrupted_second_shard":
        return [mock.patch.object(safetensors.torch, "save_file",
                                  _Countdown(safetensors.torch.save_file, 2, KeyboardInterrupt()))]
    if fault == "read_only_parent":
        denied = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        return [mock.patch("tempfile.mkdtemp", _Countdown(tempfile.mkdtemp, 1, denied)),
                mock.patch("os.mkdir", _Countdown(os.mkdir, 1, denied))]
    return []


FAULTS = ("none", "rename_fails_first", "rename_fails_second", "disk_full_first_shard",
          "disk_full_second_shard", "disk_full_manifest", "interrupted_second_shard", "read_only_parent",
          "path_under_a_file")


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _snapshot_files(directory: Path) -> dict[str, bytes] | None:
    if not directory.is_dir():
        return None
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@dataclass(frozen=True)
class DiskFaultCase:
    """`save(model, target, overwrite=...)` with `fault` injected; `existing`: target holds a model."""

    spec: ModelSpec
    fault: str = "none"
    existing: bool = False
    sharded: bool = False

    @property
    def kind(self) -> str:
        return f"{self.fault}{'+overwrite' if self.existing else ''}"

    def run(self) -> Outcome:
        import upcycle_fx

        model, pristine = saved_model(self.spec, self.sharded)
        with tempfile.TemporaryDirectory(prefix="upcycle-fx-fuzz-") as tmp:
            parent = Path(tmp)
            target = parent / "model"
            if self.fault == "path_under_a_file":
                (parent / "file").write_text("not a directory")
                target = parent / "file" / "model"
            old = None
            if self.existing:
                upcycle_fx.save(model, target, max_shard_size=10**9)
                old = _snapshot_files(target)
            max_size = SMALL_SHARDS if self.sharded or "second_shard" in self.fault else 10**9
            raised: BaseException | None = None
            with ExitStack() as stack:
                for patch in _fault_patches(self.fault):
                    stack.enter_context(patch)
                try:
                    upcycle_fx.save(model, target, max_shard_size=max_size, overwrite=self.existing)
                except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001
                    raised = error
            return self._judge(model, target, old, raised)

    def _judge(self, model, target: Path, old: dict | None, raised: BaseException | None) -> Outcome:
        import upcycle_fx

        parent = target.parent if target.parent.is_dir() else target.parent.parent
        left = _leftovers(parent, target.name)
        now = _snapshot_files(target)
        if raised is not None:
            if old is not None and now != old:
                return Outcome(Category.LOST, "the old model was lost or changed by a failed overwrite "
                               f"(target now holds {sorted(now) if now else 'nothing'}; hidden: {left})")
            if left:
                return Outcome(Category.LOST, f"half-written staging left behind: {left}")
            if old is None and now is not None:
                return Outcome(Category.LOST, "a failed save left a directory that looks like a model")
            if isinstance(raised, KeyboardInterrupt):
                return Outcome(Category.NAMED, "KeyboardInterrupt propagated, nothing written")
            return classify_exception(raised, f"save ({self.fault})")
        if left:
            return Outcome(Category.LOST, f"half-written staging left behind: {left}")
        try:
            loaded = upcycle_fx.load(target, self.spec.build())
        except Exception as error:  # noqa: BLE001
            return Outcome(Category.LOST, f"save succeeded but the result does not load: "
                                          f"{type(error).__name__}: {error}"[:200])
        return loaded_matches(model, loaded, (self.spec.inputs(),))


SAVE_ARGUMENTS: dict[str, tuple[tuple, tuple]] = {
    "max_shard_size": ((10**9, "1GB", "500KB", SMALL_SHARDS), ("lots", 0, -1, "0MB", "1.5XB", None, NAN, True, 1.5)),
    "format": (("native",), ("onnx", "", None, "NATIVE")),
    "overwrite": ((False, True), ("no", None, 1)),
    "progress": ((None,), ("yes", 3)),
}


@dataclass(frozen=True)
class SaveArgumentCase:
    """`save(model, fresh_dir, **kwargs)`: a complete, loadable checkpoint or a named error."""

    spec: ModelSpec
    kwargs: dict
    invalid: str | None = None

    @property
    def kind(self) -> str:
        return (self.invalid or "valid").split("=")[0]

    def run(self) -> Outcome:
        import upcycle_fx

        model, _ = saved_model(self.spec, False)
        with tempfile.TemporaryDirectory(prefix="upcycle-fx-fuzz-") as tmp:
            target = Path(tmp) / "model"
            try:
                upcycle_fx.save(model, target, **self.kwargs)
            except Exception as error:  # noqa: BLE001
                outcome = classify_exception(error, "save")
                left = _leftovers(Path(tmp), "model")
                if left or target.exists():
                    return Outcome(Category.LOST, f"failed save left {left or [target.name]}")
                return outcome
            if self.invalid is not None:
                return Outcome(Category.SILENT_WRONG, f"accepted invalid argument {self.invalid}")
            try:
                loaded = upcycle_fx.load(target, self.spec.build())
            except Exception as error:  # noqa: BLE001
                return Outcome(Category.LOST, f"saved checkpoint does not load: {type(error).__name__}")
            return loaded_matches(model, loaded, (self.spec.inputs(),))


@dataclass(frozen=True)
class LoadArgumentCase:
    """`load(directory, skeleton)` with a wrong skeleton or directory: a named error."""

    spec: ModelSpec
    skeleton: str = "other_width"   # "other_width" | "other_style" | "string" | "none"
    directory: str = "saved"        # "saved" | "missing" | "a_file" | "empty"

    @property
    def kind(self) -> str:
        return f"skeleton={self.skeleton},directory={self.directory}"

    def _skeleton(self) -> Any:
        if self.skeleton == "other_width":
            return ModelSpec(style=self.spec.style, act=self.spec.act, d=self.spec.d + 4, layers=2).build()
        if self.skeleton == "other_style":
            return ModelSpec(style="gated" if self.spec.style != "gated" else "dense", act="silu",
                             layers=2).build()
        return {"string": "MyModel", "none": None, "right": self.spec.build()}[self.skeleton]

    def run(self) -> Outcome:
        import upcycle_fx

        model, pristine = saved_model(self.spec, False)
        with tempfile.TemporaryDirectory(prefix="upcycle-fx-fuzz-") as tmp:
            directory = {"saved": pristine, "missing": Path(tmp) / "absent",
                         "a_file": pristine / "upcycle_fx.json", "empty": Path(tmp)}[self.directory]
            try:
                loaded = upcycle_fx.load(directory, self._skeleton())
            except Exception as error:  # noqa: BLE001
                return classify_exception(error, "load")
        if self.skeleton == "right" and self.directory == "saved":
            return loaded_matches(model, loaded, (self.spec.inputs(),))
        return Outcome(Category.SILENT_WRONG, f"load accepted skeleton={self.skeleton}, "
                                              f"directory={self.directory}")


def _small_spec(draw) -> ModelSpec:
    return ModelSpec(style=draw(st.sampled_from(("dense", "gated", "inline"))), act="silu", layers=2)


@st.composite
def disk_cases(draw, fault: str) -> DiskFaultCase:
    existing = fault != "path_under_a_file" and draw(st.sampled_from((True, False)))
    return DiskFaultCase(_small_spec(draw), fault, existing=existing, sharded=draw(st.booleans()))


SAVE_STRATA = tuple(k for k, (_, bad) in SAVE_ARGUMENTS.items() if bad) + ("load",)


@st.composite
def save_argument_cases(draw, name: str):
    """`save` with argument `name` fuzzed (invalid in the simplest draw), or `load` with a wrong
    skeleton or directory."""
    spec = _small_spec(draw)
    if name == "load":
        return LoadArgumentCase(spec, draw(st.sampled_from(("other_width", "other_style", "string", "none", "right"))),
                                draw(st.sampled_from(("saved", "missing", "a_file", "empty"))))
    valid, bad = SAVE_ARGUMENTS[name]
    if not draw(st.booleans()):
        from .repro import source

        value = draw(st.sampled_from(bad))
        return SaveArgumentCase(spec, {name: value}, invalid=f"{name}={source(value)}")
    return SaveArgumentCase(spec, {name: draw(st.sampled_from(valid))})
