"""Every user mistake and environment fault is one named error and an exit code, never a
traceback: MODEL paths that are not dense Hugging Face directories (exit 2), a full or read-only
disk (exit 1, nothing left behind), a bug (exit 1, traceback only with --traceback)."""

from __future__ import annotations

import errno
import json

import pytest

from upcycle_fx.cli import main

from cli_models import leftovers, llama_dir, mixtral_dir, run_cli, snapshot


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("models") / "llama")


def _bad_models(root):
    (root / "file.bin").write_bytes(b"x")
    (root / "empty").mkdir()
    unknown = root / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model", "architectures": ["X"]}))
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    return {"missing": (root / "missing", "does not exist"), "file": (root / "file.bin", "is a file"),
            "no-config": (root / "empty", "no config.json"), "unknown-type": (unknown, "cannot read"),
            "broken-json": (broken, "not valid JSON")}


@pytest.mark.parametrize("command", ["inspect", "rewrite", "export-onnx"])
@pytest.mark.parametrize("case", ["missing", "file", "no-config", "unknown-type", "broken-json"])
def test_bad_model_path_is_exit_2(tmp_path, capsys, command, case):
    path, message = _bad_models(tmp_path)[case]
    argv = [command, str(path)] + ([str(tmp_path / "o.onnx")] if command == "export-onnx" else [])
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert "ModelSourceError" in out and message in out, out


def test_moe_model_is_refused_subprocess(tmp_path):
    """A Mixtral directory (already MoE) gets a named error saying to start from the dense model."""
    result = run_cli("rewrite", mixtral_dir(tmp_path / "mixtral"), "--out", tmp_path / "out")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "ModelSourceError" in result.stdout and "mixture-of-experts model already" in result.stdout
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_native_checkpoint_as_model_points_to_convert(model, tmp_path, capsys):
    assert main(["rewrite", str(model), "--out", str(tmp_path / "native"), "--no-check"]) == 0
    capsys.readouterr()
    assert main(["rewrite", str(tmp_path / "native")]) == 2
    assert "upcycle-fx convert" in capsys.readouterr().out


@pytest.mark.parametrize("fault", [errno.ENOSPC, errno.EROFS])
def test_disk_fault_is_exit_1_and_leaves_nothing(model, tmp_path, capsys, monkeypatch, fault):
    """A full or read-only output disk while shards are written: one line naming the OSError and
    what to do, no traceback, no partial directory, the input untouched."""
    import safetensors.torch

    def failing_save(*args, **kwargs):
        raise OSError(fault, "simulated fault", str(args[1]))

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    before = snapshot(model)
    assert main(["rewrite", str(model), "--out", str(tmp_path / "out")]) == 1
    out = capsys.readouterr().out
    assert "CheckpointWriteError" in out and "simulated fault" in out and "Traceback" not in out
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert snapshot(model) == before


def test_unexpected_error_is_exit_1_traceback_only_when_asked(model, capsys, monkeypatch):
    from upcycle_fx.cli import commands

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(commands.api, "find_mlps", broken)
    assert main(["inspect", str(model)]) == 1
    captured = capsys.readouterr()
    assert "RuntimeError: simulated bug" in captured.out and "--traceback" in captured.out
    assert "Traceback" not in captured.out + captured.err
    assert main(["--traceback", "inspect", str(model)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_bad_option_values_are_exit_2(model, capsys):
    """Values UpcycleConfig refuses, an unknown device, a bad pattern: exit 2 before loading."""
    for argv, message in [(["--top-k", "9"], "top_k=9 exceeds"), (["--device", "tpu"], "--device"),
                          (["--pattern", "one,two"], "--pattern"), (["--expert-noise-std", "-1"], ">= 0")]:
        assert main(["rewrite", str(model), *argv]) == 2
        out = capsys.readouterr().out
        assert message in out and "loading" not in out, out
