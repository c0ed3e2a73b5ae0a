"""No command writes into, over or around its input, and output arguments are checked before
any work: the input stays byte for byte as it was, exit code 2, a named error, no traceback."""

from __future__ import annotations

import pytest

from upcycle_fx.cli import main

from cli_models import leftovers, llama_dir, run_cli, snapshot


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("models") / "llama")


def test_rewrite_out_equal_to_input_is_refused_subprocess(model):
    """`rewrite X --out X --overwrite` once deleted X and then failed with a traceback."""
    before = snapshot(model)
    result = run_cli("rewrite", model, "--out", model, "--overwrite")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "UnsafeOutputError" in result.stdout and "input model directory" in result.stdout
    assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(model) == before and leftovers(model.parent) == []


@pytest.mark.parametrize("where", ["inside", "contains", "same-via-dots"])
def test_rewrite_out_around_the_input_is_refused(model, tmp_path, capsys, where):
    before = snapshot(model)
    out = {"inside": model / "moe", "contains": model.parent, "same-via-dots": model / ".." / model.name}[where]
    assert main(["rewrite", str(model), "--out", str(out), "--overwrite"]) == 2
    assert "UnsafeOutputError" in capsys.readouterr().out
    assert snapshot(model) == before and not (model / "moe").exists()


def test_convert_out_equal_to_input_is_refused(model, tmp_path, capsys):
    native = tmp_path / "native"
    assert main(["rewrite", str(model), "--out", str(native), "--no-check", "--experts", "2"]) == 0
    before = snapshot(native)
    assert main(["convert", str(native), str(native), "--overwrite"]) == 2
    assert "UnsafeOutputError" in capsys.readouterr().out and snapshot(native) == before


def test_export_onnx_to_a_directory_is_refused_before_loading_subprocess(model, tmp_path):
    """`export-onnx DIR` (OUT.onnx forgotten) exported the built-in MiniLM, then failed with
    IsADirectoryError; now: exit 2 at once, saying the output is a directory."""
    before = snapshot(model)
    result = run_cli("export-onnx", model)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is a directory" in result.stdout and "did you forget OUT.onnx" in result.stdout
    assert "loading model" not in result.stdout and "Traceback" not in result.stderr
    assert snapshot(model) == before


def test_export_onnx_existing_file_needs_overwrite(model, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    assert main(["export-onnx", str(model), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().out and out.read_bytes() == b"keep me"


def test_export_onnx_over_an_input_file_is_refused(model, capsys):
    before = snapshot(model)
    assert main(["export-onnx", str(model), str(model / "config.json"), "--overwrite"]) == 2
    assert "file of the input model" in capsys.readouterr().out and snapshot(model) == before


def test_bad_shard_size_is_refused_before_any_work(model, tmp_path, capsys):
    """`--max-shard-size lots` was rejected only after the conversion ran."""
    assert main(["rewrite", str(model), "--out", str(tmp_path / "out"), "--max-shard-size", "lots"]) == 2
    out = capsys.readouterr().out
    assert "UsageError" in out and "--max-shard-size 'lots'" in out
    assert "loading" not in out and "wrote" not in out and list(tmp_path.iterdir()) == []
