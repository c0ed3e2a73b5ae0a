"""benchmarks/onnx_gpu.py runs on CPU with tiny shapes (--smoke), so it cannot rot between GPU
runs: its parity rows pass at the float32 tolerance and every timing row is filled in."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "benchmarks/onnx_gpu.py", *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_onnx_gpu_benchmark_smoke(tmp_path):
    out = tmp_path / "onnx.json"
    _run("--smoke", "--reps", "2", "--out", str(out))
    result = json.loads(out.read_text())
    parity = result["parity"]
    assert {(r["lowering"], r["fused_layers"] > 0) for r in parity} == {("fused", True), ("portable", False)}
    assert all(r["passed"] and r["error"] <= 1e-4 for r in parity)
    # the GELU probe tells the two forms apart: the CPU kernel's gelu is the tanh form
    probe = result["gelu_probe"]
    assert probe["measured"] == probe["declared"] == "tanh" and probe["passed"]
    assert probe["errors"]["tanh"] <= 1e-5 and probe["errors"]["erf"] >= 10 * probe["errors"]["tanh"]
    speed = result["speed"]
    assert [r["tokens"] for r in speed if r["what"] == "lm"] == [4, 16]
    assert [r["tokens"] for r in speed if r["what"] == "layer"] == [1, 16]
    for row in speed:
        assert row["fused_ms"] > 0 and row["portable_ms"] > 0 and row["best_torch_ms"] > 0
        assert row["portable_over_fused"] == row["portable_ms"] / row["fused_ms"]
    table = _run("--render", str(out)).stdout
    assert "| llm | float32 | cpu | fused |" in table and "one MoE layer (d=32" in table
    assert "GELU of the cpu kernel" in table


def test_onnx_gpu_benchmark_says_what_is_missing():
    """Without a CUDA device (hidden here), the GPU run stops with a clear message, no traceback."""
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "benchmarks/onnx_gpu.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env=environment)
    assert result.returncode == 2
    assert "--smoke" in result.stderr and "Traceback" not in result.stderr
