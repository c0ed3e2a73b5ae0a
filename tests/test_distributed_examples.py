"""The 2-GPU scripts of examples/distributed run end to end on the CPU (gloo, tiny models).

`run_all.py --smoke` launches bench.py on 1 and 2 processes, consolidates the 2-process
checkpoint, trains with train.py on 2 processes and writes the summary: every comparison must
pass (float32 2-rank losses and step-0 gradient norms within 1e-4 of one process, bf16 within
1e-2, the consolidated checkpoint's loss within 1e-4 and a bit-exact native round trip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_run_all_smoke(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "examples/distributed/run_all.py"), str(tmp_path), "--smoke"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] and summary["exit_codes"] == {"bench_1gpu": 0, "bench_2gpu": 0, "consolidate": 0,
                                                           "train": 0}
    checks = {c["check"]: c for c in summary["checks"]}
    assert len(checks) == 7 and sum(c.get("gated", True) for c in checks.values()) == 5
    fp32 = checks["fsdp_ep fp32 (2 GPUs) vs single fp32 (1 GPU)"]
    # Tiny model, 3 steps: routing stays identical, so the float32 losses agree to rounding throughout.
    assert fp32["same_routing_steps"] == 3 and fp32["gap"] <= 1e-4 and max(fp32["grad_norm_gaps"].values()) <= 1e-4
    assert [r["mode"] for r in summary["w2"]["throughput"]] == ["fsdp", "fsdp", "fsdp_ep", "fsdp_ep"]
    assert {tuple(r["global_batch"]) for r in summary["w1"]["throughput"] + summary["w2"]["throughput"]} == {(2, 64),
                                                                                                          (4, 64)}
    assert (tmp_path / "summary.md").read_text().rstrip().endswith("Overall: PASS")
    assert (tmp_path / "native" / "upcycle_fx.json").exists()
