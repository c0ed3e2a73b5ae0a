"""Checkpoints are never lost and never half-written, and damaged ones are named errors.

Replacing a model keeps a complete model at the target at every step (or puts it back);
interrupted writes (exceptions, SIGTERM, SIGINT, a full disk) leave the previous output as it
was and nothing hidden behind, and what a SIGKILLed writer leaves is cleaned up by the next
write; every corruption of a native checkpoint, at every level, is a named CheckpointError
raised before the model is used.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import upcycle_fx
from upcycle_fx import (CheckpointDtypeError, CheckpointError, CheckpointMismatchError, CheckpointWriteError,
                        InterruptedReplaceError, LeftoverOutputWarning, ManifestError, MissingShardError,
                        NotACheckpointError, OutputExistsError, OutputOverlapsInputError, ShardSizeError,
                        TerminatedDuringWriteError, TruncatedShardError)
from upcycle_fx.exporters import atomic
from upcycle_fx.exporters.atomic import atomic_directory, recover, terminate_raises
from upcycle_fx.exporters.shards import Progress
from upcycle_fx.exporters.state import tensor_table

from helpers import build

ROOT = Path(__file__).resolve().parents[1]


def _model(num_experts: int = 2) -> torch.nn.Module:
    return upcycle_fx.rewrite(build("llama"), num_experts=num_experts, top_k=1, seed=0).eval()


def _experts_in(directory: Path) -> int:
    return json.loads((directory / "upcycle_fx.json").read_text())["moe_layers"][0]["num_experts"]


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    ta, tb = tensor_table(a), tensor_table(b)
    assert list(ta.tensors) == list(tb.tensors) and ta.aliases == tb.aliases
    for name, tensor in ta.tensors.items():
        assert tensor.dtype == tb.tensors[name].dtype and torch.equal(tensor, tb.tensors[name]), name


@pytest.fixture(scope="module")
def old_model():
    return _model(2)


@pytest.fixture
def saved(tmp_path, old_model):
    """`out` holds a complete model with 2 experts per layer."""
    upcycle_fx.save(old_model, tmp_path / "out")
    return tmp_path / "out"


# --------------------------------------------------------------------------- replacing a model


def test_failed_swap_puts_the_old_model_back(saved, monkeypatch):
    """Without an atomic exchange, the old model is renamed aside and the new one renamed in; when
    the second rename fails, the old model goes back: the target never stays empty."""
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    real_replace, calls = os.replace, []

    def failing_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "injected failure", str(src))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second)
    with pytest.raises(CheckpointWriteError, match="cannot write .*out.*left as it was"):
        upcycle_fx.save(_model(3), saved, overwrite=True)
    assert _experts_in(saved) == 2 and len(calls) == 3  # aside, in (failed), back
    assert _hidden(saved.parent) == []
    monkeypatch.setattr(os, "replace", real_replace)
    upcycle_fx.load(saved)


@pytest.mark.skipif(atomic._renameat2() is None, reason="no renameat2 on this platform")
def test_overwrite_swaps_in_one_step(saved, monkeypatch):
    """Where the OS can exchange two directories, the model at the target is never renamed away."""
    def no_rename_of_target(src, dst):
        raise AssertionError(f"os.replace({src}, {dst}) during an exchange")

    monkeypatch.setattr(os, "replace", no_rename_of_target)
    upcycle_fx.save(_model(3), saved, overwrite=True)
    assert _experts_in(saved) == 3 and _hidden(saved.parent) == []


def test_failed_exchange_changes_nothing(saved, monkeypatch):
    def failing_exchange(a, b):
        raise OSError(errno.EIO, "injected failure", str(a), None, str(b))

    monkeypatch.setattr(atomic, "exchange", failing_exchange)
    with pytest.raises(CheckpointWriteError, match="injected failure"):
        upcycle_fx.save(_model(3), saved, overwrite=True)
    assert _experts_in(saved) == 2 and _hidden(saved.parent) == []


def _crash_between_renames(saved: Path, new_model: torch.nn.Module) -> tuple[Path, Path]:
    """The state a process killed between the two renames of an overwrite leaves: the old model
    aside, the complete new one still in staging, nothing at the target."""
    pid = _dead_pid()
    aside = saved.with_name(f".{saved.name}.old-{pid}-0123abcd")
    staging = saved.with_name(f".{saved.name}.partial-{pid}-4567cdef")
    upcycle_fx.save(new_model, staging)
    os.replace(saved, aside)
    return aside, staging


def test_load_reports_a_model_left_aside(saved, old_model):
    aside, _ = _crash_between_renames(saved, _model(3))
    with pytest.raises(InterruptedReplaceError, match=f"complete in .*{aside.name}.*recover"):
        upcycle_fx.load(saved)
    assert recover(saved) == [
        f"put back the model at {saved}, which a killed process had moved to {aside.name} while replacing it",
        f"removed .out.partial-{aside.name.split('-')[1]}-4567cdef, an unfinished write left beside {saved} "
        "by a killed process"]
    _same_tensors(upcycle_fx.load(saved), old_model)
    assert _hidden(saved.parent) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_next_write_recovers_a_model_left_aside(saved, old_model, overwrite):
    """The next write to the target puts the old model back first (with a warning), then acts
    as on any existing model: refused without overwrite, replaced with it."""
    _crash_between_renames(saved, _model(3))
    with pytest.warns(LeftoverOutputWarning, match="put back the model"):
        if overwrite:
            upcycle_fx.save(_model(4), saved, overwrite=True)
        else:
            with pytest.raises(OutputExistsError, match="already holds a model"):
                upcycle_fx.save(_model(4), saved)
    assert _hidden(saved.parent) == []
    if overwrite:
        assert _experts_in(saved) == 4
    else:
        _same_tensors(upcycle_fx.load(saved), old_model)


def test_leftovers_of_running_writers_are_left_alone(saved):
    """A hidden directory whose writer is alive may be a write in progress: not touched."""
    running = saved.with_name(f".{saved.name}.partial-{os.getpid()}-89abcdef")
    running.mkdir()
    assert recover(saved) == [] and running.is_dir()


def test_exception_during_overwrite_keeps_the_old_model(saved):
    class Stop(RuntimeError):
        pass

    class FailSecondTensor(Progress):
        seen = 0

        def tensor(self, name, nbytes):
            self.seen += 1
            if self.seen == 2:
                raise Stop(name)

    with pytest.raises(Stop):
        upcycle_fx.save(_model(3), saved, overwrite=True, progress=FailSecondTensor(), max_shard_size=20_000)
    assert _experts_in(saved) == 2 and _hidden(saved.parent) == []


# --------------------------------------------------------------------------- signals


WRITER = textwrap.dedent("""
    import sys, time
    import safetensors.torch
    import upcycle_fx
    from upcycle_fx.testing.handwritten import SwiGLUModel

    real_save_file, written = safetensors.torch.save_file, []

    def slow_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        written.append(filename)
        if len(written) == 2:
            print("WRITING", flush=True)
            time.sleep(120)

    safetensors.torch.save_file = slow_save_file
    model = upcycle_fx.rewrite(SwiGLUModel(), num_experts=3, top_k=1, seed=0)
    upcycle_fx.save(model, sys.argv[1], overwrite=True, max_shard_size=20_000)
""")


@pytest.mark.slow
def test_interrupted_writes_leave_the_old_model(tmp_path, old_model):
    """Three processes overwrite a model and are stopped while writing shards. SIGTERM and SIGINT:
    the process stops with a named error (KeyboardInterrupt for SIGINT), the unfinished output is
    gone, the old model untouched. SIGKILL cannot be caught: the half-written staging directory
    stays beside the intact old model, and the next write to the target removes it, saying so."""
    targets = {signum: tmp_path / signum.name / "out" for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    children = {}
    for signum, target in targets.items():
        upcycle_fx.save(old_model, target)
        children[signum] = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, text=True, env=env)
    for signum, child in children.items():
        assert child.stdout.readline().strip() == "WRITING", child.communicate()[1][-3000:]
        assert [p for p in _hidden(targets[signum].parent) if ".partial-" in p]  # the write is under way
        child.send_signal(signum)
    for signum, child in children.items():
        _, stderr = child.communicate(timeout=60)
        target = targets[signum]
        assert child.returncode != 0
        _same_tensors(upcycle_fx.load(target), old_model)
        if signum == signal.SIGKILL:
            (left,) = _hidden(target.parent)
            with pytest.warns(LeftoverOutputWarning, match=f"removed {left}, an unfinished write"):
                upcycle_fx.save(_model(4), target, overwrite=True)
            assert _experts_in(target) == 4
        else:
            expected = "TerminatedDuringWriteError" if signum == signal.SIGTERM else "KeyboardInterrupt"
            assert expected in stderr, stderr[-2000:]
        assert _hidden(target.parent) == []


def test_terminate_raises_restores_the_previous_handler(tmp_path):
    """SIGTERM raises while the guard is on, over the default handler only, from the main thread
    only; the previous handler comes back."""
    runner_handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with pytest.raises(TerminatedDuringWriteError, match="while writing"):
            with terminate_raises(tmp_path / "out"):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises before this ends
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        own = []
        signal.signal(signal.SIGTERM, lambda signum, frame: own.append(signum))
        with terminate_raises(tmp_path / "out"):  # a caller's own handler stays in charge
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)
        assert own == [signal.SIGTERM]

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        seen = []

        def in_thread():
            with terminate_raises(tmp_path / "out"):
                seen.append(signal.getsignal(signal.SIGTERM))

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join()
        assert seen == [signal.SIG_DFL]  # not installed outside the main thread
    finally:
        signal.signal(signal.SIGTERM, runner_handler)


def test_signals_wait_for_the_swap(tmp_path):
    """Inside `deferred()` SIGTERM waits; it acts when the block is done."""
    steps = []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(TerminatedDuringWriteError, match="finished"):
        with terminate_raises(tmp_path / "out") as guard:
            guard.completed = True
            with guard.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
                steps.append("swap done")
    assert steps == ["swap done"]


# --------------------------------------------------------------------------- refused before work


@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_output_overlapping_a_protected_input_is_refused(tmp_path, relation):
    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text("{}")
    target = {"same": source, "inside": source / "out", "contains": tmp_path}[relation]
    relation_text = {"same": "is", "inside": "is inside", "contains": "contains"}[relation]
    with pytest.raises(OutputOverlapsInputError, match=f"{relation_text} the input"):
        with atomic_directory(target, overwrite=True, protect=(source,)):
            raise AssertionError("no work may start")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert [p.name for p in source.iterdir()] == ["config.json"]


@pytest.mark.parametrize("size", ["lots", 0, -5, "1.5GB", "2.5", "-1GB", "0KB", 1.5, True, None])
def test_bad_max_shard_size_is_refused(tmp_path, size):
    with pytest.raises(ShardSizeError, match="max_shard_size"):
        upcycle_fx.save(_model(), tmp_path / "out", max_shard_size=size)
    assert list(tmp_path.iterdir()) == []


def test_full_disk(saved, monkeypatch):
    """The disk fills up while a shard is written: a CheckpointWriteError saying so, the old
    model untouched, nothing left behind."""
    import safetensors.torch

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CheckpointWriteError, match="disk is full") as caught:
        upcycle_fx.save(_model(3), saved, overwrite=True)
    assert caught.value.errno == errno.ENOSPC
    assert _experts_in(saved) == 2 and _hidden(saved.parent) == []


def test_too_little_free_space_is_refused_before_writing(saved, monkeypatch):
    import safetensors.torch

    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1000))
    monkeypatch.setattr(safetensors.torch, "save_file", lambda *a, **k: pytest.fail("wrote a shard"))
    with pytest.raises(CheckpointWriteError, match="1,000 bytes free.*Nothing was written"):
        upcycle_fx.save(_model(3), saved, overwrite=True)
    assert _experts_in(saved) == 2 and _hidden(saved.parent) == []


def test_output_under_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(CheckpointWriteError, match="a parent of the output is a file"):
        upcycle_fx.save(_model(), tmp_path / "notes.txt" / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unwritable_parent(tmp_path, monkeypatch):
    """A read-only parent (simulated: tests may run as root, who may write anywhere)."""
    real_mkdir = os.mkdir

    def read_only(path, *args, **kwargs):
        if Path(path).parent == tmp_path:
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    with pytest.raises(CheckpointWriteError, match="no permission to write there"):
        upcycle_fx.save(_model(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- not a checkpoint


def test_load_of_what_is_not_a_native_checkpoint(tmp_path, saved):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.safetensors").write_bytes(b"x")
    hf = tmp_path / "hf"
    build("llama").save_pretrained(hf)
    cases = {tmp_path / "missing": "does not exist", tmp_path / "empty": "is an empty directory",
             tmp_path / "file.safetensors": "is a file.*safetensors.torch.load_file",
             hf: "Hugging Face checkpoint.*from_pretrained.*convert_checkpoint",
             saved / "model.safetensors": "is a file"}
    for path, message in cases.items():
        with pytest.raises(NotACheckpointError, match=message):
            upcycle_fx.load(path)


# --------------------------------------------------------------------------- corrupt checkpoints


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A tiny upcycled Llama saved in several shards (so with an index), and the model itself."""
    model = _model(2)
    directory = tmp_path_factory.mktemp("intact") / "ckpt"
    upcycle_fx.save(model, directory, max_shard_size=100_000)
    assert (directory / "model.safetensors.index.json").is_file()
    return directory, model


class Damage:
    """Edits of one copy of the checkpoint, one structural level each."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.index = directory / "model.safetensors.index.json"

    def manifest(self, edit) -> None:
        """`edit` changes the parsed manifest in place (its return value is ignored)."""
        path = self.dir / "upcycle_fx.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    def layer(self, edit) -> None:
        self.manifest(lambda data: edit(data["moe_layers"][0]))

    def settings(self, edit) -> None:
        self.layer(lambda record: edit(record["settings"]))

    def index_json(self, edit) -> None:
        data = json.loads(self.index.read_text())
        edit(data)
        self.index.write_text(json.dumps(data))

    def shard_of(self, name: str) -> Path:
        return self.dir / json.loads(self.index.read_text())["weight_map"][name]

    def tensor(self, name: str, edit) -> None:
        """Rewrite the shard holding `name` with `edit(tensor)` in its place (None: without it)."""
        from safetensors.torch import load_file, save_file

        shard = self.shard_of(name)
        tensors = load_file(shard)
        value = edit(tensors.pop(name))
        if value is not None:
            tensors[name] = value
        save_file(tensors, shard, metadata={"format": "pt"})

    def add_tensor(self, name: str, value: torch.Tensor) -> None:
        from safetensors.torch import load_file, save_file

        shard = self.shard_of("model.norm.weight")
        save_file({**load_file(shard), name: value}, shard, metadata={"format": "pt"})

    def bytes_of(self, path: Path, edit) -> None:
        path.write_bytes(edit(path.read_bytes()))


def _dup_layer(data):
    data["moe_layers"].append(dict(data["moe_layers"][0]))


UP = "model.layers.1.mlp.experts.up_proj"
EMBED = "model.embed_tokens.weight"
CORRUPTIONS = {
    # upcycle_fx.json: the file, then each level of its structure
    "manifest-missing": (lambda d: (d.dir / "upcycle_fx.json").unlink(), NotACheckpointError),
    "manifest-not-json": (lambda d: (d.dir / "upcycle_fx.json").write_text("{"), ManifestError),
    "manifest-empty": (lambda d: (d.dir / "upcycle_fx.json").write_text(""), ManifestError),
    "manifest-not-utf8": (lambda d: (d.dir / "upcycle_fx.json").write_bytes(b"\xff\xfe{}"), ManifestError),
    "manifest-list": (lambda d: (d.dir / "upcycle_fx.json").write_text("[]"), ManifestError),
    "manifest-null": (lambda d: (d.dir / "upcycle_fx.json").write_text("null"), ManifestError),
    "manifest-number": (lambda d: (d.dir / "upcycle_fx.json").write_text("42"), ManifestError),
    "format-missing": (lambda d: d.manifest(lambda m: m.pop("format")), ManifestError),
    "format-other": (lambda d: d.manifest(lambda m: m.update(format="onnx")), ManifestError),
    "format-version-string": (lambda d: d.manifest(lambda m: m.update(format_version="1")), ManifestError),
    "format-version-newer": (lambda d: d.manifest(lambda m: m.update(format_version=2)), ManifestError),
    "model-class-missing": (lambda d: d.manifest(lambda m: m.pop("model_class")), ManifestError),
    "model-class-number": (lambda d: d.manifest(lambda m: m.update(model_class=3)), ManifestError),
    "model-class-unqualified": (lambda d: d.manifest(lambda m: m.update(model_class="Llama")), ManifestError),
    "model-class-unknown": (lambda d: d.manifest(lambda m: m.update(model_class="transformers.NoSuchModel")),
                            CheckpointError),
    "unknown-key": (lambda d: d.manifest(lambda m: m.update(experts_dtype="fp8")), ManifestError),
    "moe-layers-missing": (lambda d: d.manifest(lambda m: m.pop("moe_layers")), ManifestError),
    "moe-layers-null": (lambda d: d.manifest(lambda m: m.update(moe_layers=None)), ManifestError),
    "moe-layers-object": (lambda d: d.manifest(lambda m: m.update(moe_layers={})), ManifestError),
    "moe-layers-empty": (lambda d: d.manifest(lambda m: m.update(moe_layers=[])), CheckpointMismatchError),
    "layer-list": (lambda d: d.manifest(lambda m: m.update(moe_layers=[[]])), ManifestError),
    "layer-key-missing": (lambda d: d.layer(lambda r: r.pop("d_ff")), ManifestError),
    "layer-key-unknown": (lambda d: d.layer(lambda r: r.update(shared_expert=True)), ManifestError),
    "layer-duplicated": (lambda d: d.manifest(_dup_layer), ManifestError),
    "num-experts-string": (lambda d: d.layer(lambda r: r.update(num_experts="2")), ManifestError),
    "num-experts-bool": (lambda d: d.layer(lambda r: r.update(num_experts=True)), ManifestError),
    "num-experts-zero": (lambda d: d.layer(lambda r: r.update(num_experts=0)), ManifestError),
    "num-experts-other": (lambda d: d.layer(lambda r: r.update(num_experts=3)), CheckpointMismatchError),
    "d-ff-float": (lambda d: d.layer(lambda r: r.update(d_ff=1.5)), ManifestError),
    "d-ff-other": (lambda d: d.layer(lambda r: r.update(d_ff=r["d_ff"] + 1)), CheckpointMismatchError),
    "mlp-index-negative": (lambda d: d.layer(lambda r: r.update(mlp_index=-1)), ManifestError),
    "path-other": (lambda d: d.layer(lambda r: r.update(path="model.layers.0.mlp")), CheckpointMismatchError),
    "activation-other": (lambda d: d.layer(lambda r: r.update(activation="tanh")), CheckpointMismatchError),
    "dispatch-unknown": (lambda d: d.layer(lambda r: r.update(dispatch_impl="warp")), ManifestError),
    "dispatch-number": (lambda d: d.layer(lambda r: r.update(dispatch_impl=3)), ManifestError),
    "dropout-out-of-range": (lambda d: d.layer(lambda r: r.update(hidden_dropout=2.0)), ManifestError),
    "gated-string": (lambda d: d.layer(lambda r: r.update(gated="yes")), ManifestError),
    "settings-null": (lambda d: d.layer(lambda r: r.update(settings=None)), ManifestError),
    "settings-unknown-key": (lambda d: d.settings(lambda s: s.update(jitter=0.1)), ManifestError),
    "routing-unknown": (lambda d: d.settings(lambda s: s.update(routing="top_p")), ManifestError),
    "top-k-string": (lambda d: d.settings(lambda s: s.update(top_k="1")), ManifestError),
    "top-k-too-large": (lambda d: d.settings(lambda s: s.update(top_k=5)), ManifestError),
    "capacity-negative": (lambda d: d.settings(lambda s: s.update(capacity_factor=-1.0)), ManifestError),
    "aliases-list": (lambda d: d.manifest(lambda m: m.update(aliases=[])), ManifestError),
    "alias-to-nothing": (lambda d: d.manifest(lambda m: m.update(aliases={"lm_head.weight": "nowhere"})),
                         CheckpointMismatchError),
    "format-version-zero": (lambda d: d.manifest(lambda m: m.update(format_version=0)), ManifestError),
    "alias-drops-a-tensor": (lambda d: d.manifest(lambda m: m.update(aliases={"lm_head.weight": EMBED})),
                             CheckpointMismatchError),
    "training-string": (lambda d: d.manifest(lambda m: m.update(training="no")), ManifestError),
    "non-persistent-string": (lambda d: d.manifest(lambda m: m.update(non_persistent="x")), ManifestError),
    "versions-list": (lambda d: d.manifest(lambda m: m.update(versions=[])), ManifestError),
    "hf-config-list": (lambda d: d.manifest(lambda m: m.update(hf_config=[])), ManifestError),
    "hf-config-null": (lambda d: d.manifest(lambda m: m.update(hf_config=None)), ManifestError),
    "hf-config-bad-value": (lambda d: d.manifest(lambda m: m["hf_config"].update(hidden_size="big")),
                            ManifestError),
    "hf-config-other-size": (lambda d: d.manifest(lambda m: m["hf_config"].update(intermediate_size=96)),
                             CheckpointMismatchError),
    # model.safetensors.index.json
    "index-not-json": (lambda d: d.index.write_text("{"), ManifestError),
    "index-list": (lambda d: d.index.write_text("[]"), ManifestError),
    "index-null": (lambda d: d.index.write_text("null"), ManifestError),
    "index-no-weight-map": (lambda d: d.index_json(lambda i: i.pop("weight_map")), ManifestError),
    "index-weight-map-list": (lambda d: d.index_json(lambda i: i.update(weight_map=[])), ManifestError),
    "index-weight-map-empty": (lambda d: d.index_json(lambda i: i.update(weight_map={})), ManifestError),
    "index-file-number": (lambda d: d.index_json(lambda i: i["weight_map"].update({EMBED: 3})), ManifestError),
    "index-file-outside": (lambda d: d.index_json(lambda i: i["weight_map"].update({EMBED: "../x.safetensors"})),
                           ManifestError),
    "index-wrong-shard": (lambda d: d.index_json(lambda i: i["weight_map"].update(
        {EMBED: i["weight_map"]["model.norm.weight"]})), CheckpointMismatchError),
    "index-missing-shard": (lambda d: d.index_json(lambda i: i["weight_map"].update(
        {EMBED: "model-00099-of-00099.safetensors"})), MissingShardError),
    "index-extra-name": (lambda d: d.index_json(lambda i: i["weight_map"].update(
        {"ghost.weight": i["weight_map"][EMBED]})), CheckpointMismatchError),
    # shard files
    "shard-deleted": (lambda d: d.shard_of(EMBED).unlink(), MissingShardError),
    "shard-empty": (lambda d: d.shard_of(EMBED).write_bytes(b""), TruncatedShardError),
    "shard-truncated": (lambda d: d.bytes_of(d.shard_of(EMBED), lambda b: b[:-64]), TruncatedShardError),
    "shard-header-cut": (lambda d: d.bytes_of(d.shard_of(EMBED), lambda b: b[:20]), TruncatedShardError),
    "shard-header-length": (lambda d: d.bytes_of(d.shard_of(EMBED), lambda b: (2**40).to_bytes(8, "little") + b[8:]),
                            TruncatedShardError),
    "shard-header-garbage": (lambda d: d.bytes_of(d.shard_of(EMBED), lambda b: b[:8] + b"#" * 16 + b[24:]),
                             TruncatedShardError),
    # tensors against the rebuilt model
    "tensor-int32": (lambda d: d.tensor(EMBED, lambda t: t.to(torch.int32)), CheckpointDtypeError),
    "tensor-bool": (lambda d: d.tensor(f"{UP}", lambda t: t > 0), CheckpointDtypeError),
    "tensor-float64": (lambda d: d.tensor(EMBED, lambda t: t.double()), CheckpointDtypeError),
    "tensor-float16": (lambda d: d.tensor(f"{UP}", lambda t: t.half()), CheckpointDtypeError),
    "buffer-int64": (lambda d: d.tensor("model.rotary_emb.inv_freq", lambda t: t.long()), CheckpointDtypeError),
    "tensor-shape": (lambda d: d.tensor(EMBED, lambda t: t[:-1]), CheckpointMismatchError),
    "tensor-transposed": (lambda d: d.tensor("lm_head.weight", lambda t: t.t().contiguous()),
                          CheckpointMismatchError),
    "tensor-removed": (lambda d: d.tensor("model.norm.weight", lambda t: None), CheckpointMismatchError),
    "tensor-extra": (lambda d: d.add_tensor("model.extra", torch.zeros(3)), CheckpointMismatchError),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupt_checkpoint_is_a_named_error(intact, tmp_path, case):
    """Each corruption, at every level (manifest file, its structure, keys, types and values; the
    index; shard files and headers; tensors against the rebuilt model), is the named error that
    says what it is, raised by `load` itself (never at the first forward)."""
    damage, expected = CORRUPTIONS[case]
    copy = tmp_path / "ckpt"
    shutil.copytree(intact[0], copy)
    damage(Damage(copy))
    with pytest.raises(expected) as caught:
        upcycle_fx.load(copy)
    assert isinstance(caught.value, CheckpointError)
    assert str(copy) in str(caught.value)  # says where


def test_intact_checkpoint_loads_bit_for_bit(intact):
    loaded = upcycle_fx.load(intact[0])
    _same_tensors(loaded, intact[1])
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, intact[1](input_ids=ids).logits)


def _nodes(value, path=()):
    """Every (path, value) of a parsed JSON document, the root included."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _nodes(item, path + (i,))


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-3, 600) | st.floats(allow_nan=False)
                           | st.text(max_size=8) | st.sampled_from(["auto", "top_k", "silu", "float64"]),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3),
                           max_leaves=4)


def _loads_and_runs_or_is_named(directory: Path) -> None:
    """The property every damaged checkpoint must have: a named CheckpointError from `load`, or
    a model that computes."""
    try:
        model = upcycle_fx.load(directory)
    except CheckpointError:
        return
    with torch.no_grad():
        model(input_ids=torch.arange(6).reshape(1, 6))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifest_is_named_or_loads_and_runs(intact, tmp_path, data):
    """Any node of upcycle_fx.json replaced by any JSON value (hypothesis)."""
    copy = Path(tempfile.mkdtemp(dir=tmp_path)) / "ckpt"
    shutil.copytree(intact[0], copy)
    manifest = json.loads((copy / "upcycle_fx.json").read_text())
    path, _ = data.draw(st.sampled_from(list(_nodes(manifest))))
    value = data.draw(JSON_VALUES)
    if not path:
        manifest = value
    else:
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        parent[path[-1]] = value
    (copy / "upcycle_fx.json").write_text(json.dumps(manifest))
    _loads_and_runs_or_is_named(copy)
    shutil.rmtree(copy.parent)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_shard_header_is_named_or_loads_and_runs(intact, tmp_path, data):
    """One byte of a shard's header (its length or its JSON) changed (hypothesis)."""
    copy = Path(tempfile.mkdtemp(dir=tmp_path)) / "ckpt"
    shutil.copytree(intact[0], copy)
    shard = data.draw(st.sampled_from(sorted(copy.glob("*.safetensors"))))
    raw = bytearray(shard.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    raw[data.draw(st.integers(0, header_end - 1))] = data.draw(st.integers(0, 255))
    shard.write_bytes(bytes(raw))
    _loads_and_runs_or_is_named(copy)
    shutil.rmtree(copy.parent)


@pytest.mark.parametrize("call", [
    lambda d: upcycle_fx.save("not a model", d),
    lambda d: upcycle_fx.save(torch.nn.Linear(2, 2), 3),
    lambda d: upcycle_fx.save(torch.nn.Linear(2, 2), d, overwrite="no"),
    lambda d: upcycle_fx.save(torch.nn.Linear(2, 2), d, format="onnx"),
    lambda d: upcycle_fx.load(3),
    lambda d: upcycle_fx.load(d, skeleton="llama"),
], ids=["model", "directory", "overwrite", "format", "load-directory", "load-skeleton"])
def test_save_and_load_name_bad_arguments_before_work(call, tmp_path):
    """Arguments of the wrong kind are a CheckpointError naming them, and nothing is written."""
    with pytest.raises(upcycle_fx.CheckpointError, match="save|load|format"):
        call(tmp_path / "out")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_convert_checkpoint_refuses_its_own_input_as_output(tmp_path):
    """convert_checkpoint(src, src, overwrite=True) would replace the checkpoint it reads: refused
    before any work, the input left as it was."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    source = tmp_path / "llama"
    transformers.LlamaForCausalLM(config).save_pretrained(source)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    for output in (source, source / "moe"):
        with pytest.raises(upcycle_fx.OutputOverlapsInputError):
            upcycle_fx.convert_checkpoint(source, output, overwrite=True)
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before


def test_failed_move_into_place_is_a_write_error(tmp_path, monkeypatch):
    """The final rename of a new output failing (an I/O error, no file name attached) is a
    CheckpointWriteError, and nothing is left behind."""
    real_replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if Path(dst).name == "out":
            raise OSError(errno.EIO, "I/O error")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(CheckpointWriteError):
        upcycle_fx.save(_model(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
