"""Interruptions: SIGTERM (Slurm, Kubernetes, `timeout`) and Ctrl-C stop a conversion cleanly:
one line saying nothing was written, exit 143 / 130, no traceback, no partial or hidden directory
beside OUT, the input untouched."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from upcycle_fx.cli import main
from upcycle_fx.cli.display import SHARD_DELAY_ENV

from cli_models import cli_env, leftovers, llama_dir, snapshot


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("models") / "llama")


def _wait_for_staging(parent, process, timeout=120.0):
    """Wait until the writer's hidden staging directory appears beside OUT (the write has begun)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if any(p.name.startswith(".") and "partial" in p.name for p in parent.iterdir()):
            return True
        time.sleep(0.05)
    return False


def test_sigterm_mid_conversion_subprocess(model, tmp_path):
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    out = out_parent / "moe"
    before = snapshot(model)
    process = subprocess.Popen(
        [sys.executable, "-m", "upcycle_fx", "rewrite", str(model), "--out", str(out), "--experts", "2",
         "--max-shard-size", "20KB"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=cli_env(**{SHARD_DELAY_ENV: "0.5"}))
    try:
        assert _wait_for_staging(out_parent, process), "the conversion never started writing"
        time.sleep(0.3)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stdout + stderr
    assert f"interrupted; nothing was written to {out}" in stdout
    assert "Traceback" not in stderr + stdout
    assert not out.exists() and leftovers(out_parent) == []
    assert snapshot(model) == before


def test_ctrl_c_mid_conversion(model, tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt while the second shard is written: exit 130, nothing left behind."""
    from upcycle_fx.cli import display

    shards = []

    def interrupting_shard(self, filename):
        shards.append(filename)
        if len(shards) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(display.ProgressBars, "shard", interrupting_shard)
    out = tmp_path / "moe"
    assert main(["rewrite", str(model), "--out", str(out), "--max-shard-size", "20KB"]) == 130
    assert f"interrupted; nothing was written to {out}" in capsys.readouterr().out
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_handler_is_restored_after_main(model, capsys):
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["inspect", str(model)]) == 0
    assert signal.getsignal(signal.SIGTERM) is previous
