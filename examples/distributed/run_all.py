"""Issue 7 on a 2-GPU machine, one command: same numbers, tokens/s, checkpoints, a training run.

    python examples/distributed/run_all.py OUT            # 2 GPUs (about 4-5 minutes on 2 H200s)
    python examples/distributed/run_all.py OUT --smoke    # CPU, gloo, tiny models (about 1 minute)

Steps (each a subprocess; logs in OUT/logs/):
1. bench.py on 1 GPU  -> OUT/w1.json   (single fp32, single bf16, FSDP2-on-1-GPU bf16; tokens/s)
2. bench.py on 2 GPUs -> OUT/w2.json   (FSDP2 and FSDP2+EP, fp32 and bf16; tokens/s;
   the FSDP2+EP fp32 run saved as a sharded checkpoint in OUT/ckpt)
3. consolidate.py: OUT/ckpt in one process, validation loss vs the 2-GPU one, upcycle_fx.save
   to OUT/native and back                                        -> OUT/consolidate.json
4. train.py on 2 GPUs (FSDP2+EP, 300 steps on real text)        -> OUT/train/train.json
5. the side-by-side summary                                     -> OUT/summary.md, OUT/summary.json
Exit status 0 when every comparison passes its tolerance. NVLink multicast stays off
(NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 in every child's environment).
"""

from __future__ import annotations

import _bootstrap  # noqa: F401

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FP32_TOLERANCE = 1e-4   # as bench.py
BF16_TOLERANCE = 1e-2


def child_env(smoke: bool) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    env["OMP_NUM_THREADS"] = "1" if smoke else env.get("OMP_NUM_THREADS", "8")
    return env


def torchrun(world: int, script: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
            str(HERE / script), *args]


DEADLINE = [float("inf")]   # perf_counter time by which every step must have ended (--budget)


def run(name: str, command: list[str], out: Path, env: dict, timeout: float, times: dict) -> int:
    """Run one step, tee its output to OUT/logs/<name>.log, record its wall time. The step is
    killed (exit 124) after `timeout` seconds or at the deadline of --budget, whichever is first."""
    timeout = min(timeout, DEADLINE[0] - time.perf_counter())
    if timeout <= 0:
        print(f"== {name}: skipped, no time left in --budget", flush=True)
        times[name] = 0.0
        return 124
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        try:
            expired = threading.Event()
            killer = threading.Timer(timeout, lambda: (expired.set(), process.kill()))
            killer.start()
            for line in process.stdout:
                sink.write(line)
                if not line.startswith(("[rank", "W1", "I1")) and "redistribut" not in line:
                    print("   " + line, end="", flush=True)
            code = process.wait()
            killer.cancel()
            if expired.is_set():
                code = 124
        except KeyboardInterrupt:
            process.kill()
            raise
    times[name] = round(time.perf_counter() - start, 1)
    print(f"== {name}: exit {code} after {times[name]} s", flush=True)
    return code


def relative_gap(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / abs(y) for x, y in zip(a, b)), default=0.0)


# (2-GPU mode, dtype, 1-GPU mode, dtype, kind of comparison)
COMPARISONS = [("fsdp", "fp32", "single", "fp32", "fp32"), ("fsdp_ep", "fp32", "single", "fp32", "fp32"),
               ("fsdp", "bf16", "fsdp", "bf16", "bf16"), ("fsdp_ep", "bf16", "fsdp", "bf16", "bf16"),
               ("fsdp", "bf16", "single", "bf16", "recipe"), ("fsdp_ep", "bf16", "single", "bf16", "recipe")]
FEW_STEPS = 5   # "a few optimiser steps": the window of the strict checks
CHECKS_LEGEND = (
    "Checks. fp32 against one process: the step-0 gradient norms within 1e-4 (a gradient scale error "
    "shows there, AdamW hides it from the losses), the losses within 1e-4 over the first "
    f"{FEW_STEPS} steps and for as long as the global expert loads are equal step by step, and all "
    "losses and the validation loss within 1e-2 (bf16 "
    "tolerance, the issue's bound): top-k routing is discontinuous, so once a near-tie flips between two "
    "reduction orders the trajectories part by more than rounding. bf16 against FSDP2 on one GPU (the "
    f"same mixed-precision numerics): the losses of the first {FEW_STEPS} steps and the step-0 gradient norms "
    "within 1e-2; the gaps over all steps are shown, not checked: bf16 rounding differences grow "
    "with every step (compare the two 1-GPU bf16 columns, which differ only in where they round). "
    "Against the single-process bf16 recipe (bf16 working weights, float32 masters) the gaps are "
    "reported, not checked ('info').")


def compare(got: dict, ref: dict, kind: str) -> dict:
    """One 2-GPU run against one 1-GPU run (see CHECKS_LEGEND)."""
    same = 0
    while same < min(len(got["loads"]), len(ref["loads"])) and got["loads"][same] == ref["loads"][same]:
        same += 1
    gap = relative_gap(got["loss"] + [got["val_loss"]], ref["loss"] + [ref["val_loss"]])
    gap_same = relative_gap(got["loss"][:same], ref["loss"][:same])
    norm_gaps = {part: abs(got["grad_norms_step0"][part] - ref["grad_norms_step0"][part])
                 / ref["grad_norms_step0"][part] for part in ("experts", "other")}
    gap_few = relative_gap(got["loss"][:FEW_STEPS], ref["loss"][:FEW_STEPS])
    if kind == "fp32":
        passed = (gap <= BF16_TOLERANCE and max(gap_few, gap_same) <= FP32_TOLERANCE
                  and max(norm_gaps.values()) <= FP32_TOLERANCE)
    else:
        passed = gap_few <= BF16_TOLERANCE and max(norm_gaps.values()) <= BF16_TOLERANCE
    return {"kind": kind, "gated": kind != "recipe", "passed": passed, "gap": gap, "gap_first_steps": gap_few,
            "same_routing_steps": same,
            "gap_same_routing": gap_same, "aux_gap": relative_gap(got["aux"], ref["aux"]),
            "grad_norm_gaps": norm_gaps}


def find(rows: list[dict], mode: str, dtype: str) -> dict | None:
    return next((r for r in rows if r["mode"] == mode and r["dtype"] == dtype), None)


def summarize(out: Path, times: dict, codes: dict) -> dict:
    """Losses side by side, the checks, the tokens/s table: OUT/summary.md and .json."""
    w1 = json.loads((out / "w1.json").read_text()) if (out / "w1.json").exists() else {}
    w2 = json.loads((out / "w2.json").read_text()) if (out / "w2.json").exists() else {}
    consolidated = json.loads((out / "consolidate.json").read_text()) if (out / "consolidate.json").exists() else None
    train = json.loads((out / "train" / "train.json").read_text()) if (out / "train" / "train.json").exists() else None
    lines = ["# FSDP2 + expert parallelism: 1 vs 2 GPUs", ""]
    meta = w2.get("meta") or w1.get("meta") or {}
    lines.append(f"Device: {meta.get('device')} · torch {meta.get('torch')} · transformers "
                 f"{meta.get('transformers')} · python {meta.get('python')} · step times (s): {times}")
    checks: list[dict] = []
    eq1, eq2 = w1.get("equivalence", []), w2.get("equivalence", [])
    columns = [(1, r) for r in eq1] + [(2, r) for r in eq2]
    if columns:
        lines += ["", "## Same numbers: loss per step (mean over ranks = loss of the global batch)", "",
                  "| step | " + " | ".join(f"{g} GPU {r['mode']} {r['dtype']}" for g, r in columns) + " |",
                  "|---:|" + "---:|" * len(columns)]
        for step in range(len(columns[0][1]["loss"])):
            lines.append(f"| {step} | " + " | ".join(f"{r['loss'][step]:.5f}" for _, r in columns) + " |")
        lines.append("| val | " + " | ".join(f"{r['val_loss']:.5f}" for _, r in columns) + " |")
        lines += ["", f"| 2 GPUs | against 1 GPU | max rel. loss gap, first {FEW_STEPS} steps | all steps + val | "
                  "leading steps with equal global expert loads | max rel. loss gap on those | max rel. aux gap | "
                  "step-0 gradient norm rel. gap: experts / other | |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for mode, dtype, ref_mode, ref_dtype, kind in COMPARISONS:
            got, ref = find(eq2, mode, dtype), find(eq1, ref_mode, ref_dtype)
            if got is None or ref is None:
                continue
            check = compare(got, ref, kind)
            check["check"] = f"{mode} {dtype} (2 GPUs) vs {ref_mode} {ref_dtype} (1 GPU)"
            checks.append(check)
            verdict = "PASS" if check["passed"] else "FAIL"
            lines.append(f"| {mode} {dtype} | {ref_mode} {ref_dtype} | {check['gap_first_steps']:.1e} | {check['gap']:.1e} | "
                         f"{check['same_routing_steps']} | {check['gap_same_routing']:.1e} | {check['aux_gap']:.1e} | "
                         f"{check['grad_norm_gaps']['experts']:.1e} / {check['grad_norm_gaps']['other']:.1e} | "
                         f"{verdict if check['gated'] else 'info (' + verdict.lower() + ')'} |")
        lines += ["", CHECKS_LEGEND]
    tp = w1.get("throughput", []) + w2.get("throughput", [])
    if tp:
        lines += ["", "## Tokens per second (same model, same global batch)", "",
                  f"Model: {tp[0]['params']:,} parameters ({tp[0]['active_params']:,.0f} active per token), "
                  "bf16 compute, AdamW; ratio against one GPU without torch.distributed on the same global batch; "
                  "host: wall time per step before waiting for the GPU (close to the step time: the CPU, "
                  "or a host sync, sets the pace).", "",
                  "| global batch (tokens) | GPUs | mode | step (ms) | host (ms) | tokens/s | per GPU | vs 1 GPU single | "
                  "peak memory per GPU (GiB) | MFU |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(tp, key=lambda r: r["global_batch"][0]):
            base = next((b for b in w1.get("throughput", []) if b["mode"] == "single"
                         and b["global_batch"] == r["global_batch"]), None)
            ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
            rows, seq = r["global_batch"]
            lines.append(f"| {rows} x {seq} | {r['world']} | {r['mode']} {r['dtype']} | {r['step_ms']:.1f} | "
                         f"{r.get('host_ms', float('nan')):.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {ratio:.2f}x | "
                         f"{r['peak_memory_gib']:.1f} | {mfu} |")
    if consolidated:
        checks.append({"check": "sharded checkpoint consolidated in one process", **consolidated})
        lines += ["", "## Checkpoint", "",
                  f"The 2-GPU FSDP2+EP float32 run, saved with DCP and consolidated in one process "
                  f"({consolidated['model']}, {consolidated['params']:,} parameters): validation loss "
                  f"{consolidated['val_loss_single_process']:.6f} vs {consolidated['val_loss_distributed']:.6f} on the "
                  f"ranks (relative error {consolidated['relative_error']:.1e}); upcycle_fx.save / load round trip "
                  f"{'equal' if consolidated['native_roundtrip_equal'] else 'DIFFERENT'}: "
                  f"{'PASS' if consolidated['passed'] else 'FAIL'}."]
    if train:
        first, last = train["curve"][0], train["curve"][-1]
        lines += ["", "## Training run (train.py)", "",
                  f"{train['mode']} on {train['world']} GPUs, {train['steps_done']} steps, global batch "
                  f"{train['batch']} x {train['spec']['seq']} bytes: validation {first['val_bpb']:.3f} bpb at step "
                  f"{first['step']} -> {last['val_bpb']:.3f} at step {last['step']}; {last['tokens_per_s']:,.0f} tokens/s; "
                  f"first MoE layer max/mean load {last['balance']:.2f}."]
    failed = {name: code for name, code in codes.items() if code != 0}
    if failed:
        lines += ["", f"Steps that failed (exit codes): {failed}; see OUT/logs/."]
    passed = not failed and bool(checks) and all(c["passed"] for c in checks if c.get("gated", True))
    lines += ["", f"Overall: {'PASS' if passed else 'FAIL'}"]
    summary = {"passed": passed, "checks": checks, "times_s": times, "exit_codes": codes, "w1": w1, "w2": w2,
               "consolidate": consolidated, "train": train}
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(lines), flush=True)
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny models")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables of the throughput runs "
                        "in OUT/profiles")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for all steps together; a step still running then is killed")
    args = parser.parse_args(argv)
    if args.budget is not None:
        DEADLINE[0] = time.perf_counter() + args.budget
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(args.smoke)
    smoke = ["--smoke"] if args.smoke else []
    profile = ["--profile", str(out / "profiles")] if args.profile else []
    times: dict[str, float] = {}
    codes: dict[str, int] = {}
    codes["bench_1gpu"] = run("bench_1gpu", torchrun(1, "bench.py", "--out", str(out), *smoke, *profile), out, env, 240, times)
    codes["bench_2gpu"] = run("bench_2gpu", torchrun(2, "bench.py", "--out", str(out), "--checkpoint",
                                                     str(out / "ckpt"), *smoke, *profile), out, env, 240, times)
    if codes["bench_2gpu"] == 0:
        codes["consolidate"] = run("consolidate", [sys.executable, str(HERE / "consolidate.py"), str(out / "ckpt"),
                                                   "--expected", str(out / "checkpoint_expected.json"),
                                                   "--native", str(out / "native"), "--out",
                                                   str(out / "consolidate.json")], out, env, 120, times)
    codes["train"] = run("train", torchrun(2, "train.py", "--out", str(out / "train"), "--steps",
                                           str(args.train_steps), *smoke), out, env, 180, times)
    summary = summarize(out, times, codes)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
