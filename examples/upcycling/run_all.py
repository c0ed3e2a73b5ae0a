"""Every experiment of issue 6 in sequence, within a time budget, with each part's time.

    PYTHONPATH=. python examples/upcycling/run_all.py --out examples/upcycling/runs/h100 --budget-min 14
    python examples/upcycling/run_all.py --out /tmp/upcycling --smoke          # CPU, tiny (CI)

Parts: data (read the corpus), plan (measure throughput, size the run to the budget), pretrain,
compare, ablations, minilm. `--parts` runs a subset; a part whose results exist is skipped
(unless --force), so a run cut short continues where it stopped, and its time counts against
the same budget (run_all.json keeps the plan and the seconds spent). Results: one folder per
part under --out, plus summary.md (every number the README asks for) and run_all.json.
`--export DIR` also writes DIR/upcycling_results.tar.gz (all results but checkpoints and ONNX
files) and copies summary.md, run_all.json and the three plots there (6 files; the device
tool hands back at most 8).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    import _bootstrap  # noqa: F401

import argparse
import dataclasses
import os
import shutil
import tarfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

import upcycle_fx

from upcycling import ablations as ablations_mod, compare as compare_mod, data, minilm as minilm_mod, plan
from upcycling.arms import Checkpoint
from upcycling.model import SPECS, Variant, build_dense, upcycle
from upcycling.results import read_json, write_json
from upcycling.train import (DEFAULT_PRETRAIN_TOKENS, MAX_PRETRAIN_EPOCHS, SMOKE_DATA, TRAIN_CONFIGS,
                             describe_device, measure, pretrain, resolve_device)

PARTS = ("pretrain", "compare", "ablations", "minilm")
RESULT_FILE = {"pretrain": "pretrain/summary.json", "compare": "compare/summary.json",
               "ablations": "ablations/summary.json", "minilm": "minilm/minilm.json"}
MINILM_RESERVE_S = 60.0   # minilm part on the GPU machine (random weights, no onnxruntime)
MARGIN = 0.05             # of the budget, kept free
SMOKE_SHAPE = plan.Shape(compare_evals=4, ablation_evals=3, pretrain_evals=6)
NOT_IN_BUNDLE = (".pt", ".onnx", ".onnx.data", ".data")


class Log:
    """Prints (flushed) and appends to run_all.log."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a")

    def __call__(self, message: str) -> None:
        print(message, flush=True)
        self.file.write(message + "\n")
        self.file.flush()


def measure_machine(preset: str, corpus: data.Corpus, device: torch.device, steps: int) -> plan.Measured:
    """Throughput of the dense and the upcycled (comparison) model on this machine."""
    spec, cfg = SPECS[preset], TRAIN_CONFIGS[preset]
    dense = build_dense(spec, seed=0)
    d = measure(dense, spec, cfg, corpus, device=device, steps=steps, warmup=max(1, steps // 3))
    started = time.perf_counter()
    upcycled = upcycle(dense, Variant(), seed=0)
    overhead = time.perf_counter() - started + 1.0
    u = measure(upcycled, spec, cfg, corpus, device=device, steps=steps, warmup=max(1, steps // 3))
    return plan.Measured(d["tokens_per_s"], u["tokens_per_s"], d["flops_per_token"], u["flops_per_token"],
                         max(d["eval_seconds"], u["eval_seconds"]), overhead)


def commands(out: Path, state: dict, smoke: bool) -> list[str]:
    """The per-experiment commands that redo this run with the numbers the plan chose."""
    p, shape = state["plan"], state["shape"]
    flag = " --smoke" if smoke else ""
    script = "python examples/upcycling/"
    ckpt = out / "pretrain" / "dense.pt"
    fracs = state.get("fractions", {})
    root = f" --data-root {state['data_root']}" if state.get("data_root") else ""
    return [f"{script}train.py --out {out / 'pretrain'} --tokens {p['pretrain_tokens']}{root}{flag}",
            f"{script}compare.py --checkpoint {ckpt} --out {out / 'compare'} --extra-frac "
            f"{fracs.get('compare', p['compare_frac']):.4g} --evals {shape['compare_evals']}{flag}",
            f"{script}ablations.py --checkpoint {ckpt} --out {out / 'ablations'} --extra-frac "
            f"{fracs.get('ablations', p['ablation_frac']):.4g} --evals {shape['ablation_evals']}{flag}",
            f"{script}minilm.py --out {out / 'minilm'}{flag}"]


def write_summary(out: Path, state: dict, smoke: bool) -> Path:
    """summary.md: times, plan, and each part's own summary."""
    lines = ["# Sparse upcycling on real text: results", "",
             f"Device: {state['device']}; upcycle_fx {upcycle_fx.__version__}; corpus: "
             f"{state['corpus']['files_train']} + {state['corpus']['files_val']} .py files of "
             f"{state['corpus'].get('root') or 'Python ' + state['corpus']['python'] + chr(39) + 's stdlib'}, "
             f"{state['corpus']['bytes_train']:,} training bytes, "
             f"{state['corpus']['bytes_val']:,} validation bytes (sha256 {state['corpus']['sha256']}).", "",
             f"Budget {state['budget_s']:.0f} s; plan: pretrain {state['plan']['pretrain_tokens']:,} bytes "
             f"(limited by {state['plan']['limited_by']}), measured {state['measured']['dense_tokens_per_s']:,.0f} "
             f"bytes/s dense and {state['measured']['upcycled_tokens_per_s']:,.0f} upcycled.", "",
             "| part | seconds | planned |", "|---|---:|---:|"]
    for part, t in state["seconds"].items():
        lines.append(f"| {part} | {t:.1f} | {state['plan']['predicted_s'].get(part, '')} |")
    lines.append(f"| total | {sum(state['seconds'].values()):.1f} | |")
    pre = out / RESULT_FILE["pretrain"]
    if pre.is_file():
        s = read_json(pre)
        lines += ["", "## Dense pretraining", "",
                  f"{s['params']:,} parameters, {s['tokens']:,} bytes ({s['epochs']:.2f} epochs), "
                  f"{s['flops']:.3g} FLOPs, {s['train_seconds']:.0f} s at {s['tokens_per_s']:,.0f} bytes/s: "
                  f"validation {s['final_val_bpb']:.4f} bits/byte."]
    for part, title in (("compare", "Dense vs upcycled continuation"), ("ablations", "Ablations"),
                        ("minilm", "all-MiniLM-L6-v2")):
        md = out / part / ("minilm.md" if part == "minilm" else "summary.md")
        if md.is_file():
            lines += ["", f"## {title}", "", md.read_text().strip()]
    lines += ["", "## Commands that redo this run part by part", "", "```",
              *commands(out, state, smoke), "```"]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def export(out: Path, dest: Path) -> list[Path]:
    """The bundle for a machine that only takes a few files back (see the module doc)."""
    dest.mkdir(parents=True, exist_ok=True)
    bundle = dest / "upcycling_results.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            if path.is_file() and not path.name.endswith(NOT_IN_BUNDLE):
                tar.add(path, arcname=str(Path(out.name) / path.relative_to(out)))
    copied = [bundle]
    for rel in ("summary.md", "run_all.json", "pretrain/pretrain.png", "compare/compare.png",
                "ablations/ablations.png"):
        if (out / rel).is_file():
            target = dest / Path(rel).name
            shutil.copyfile(out / rel, target)
            copied.append(target)
    return copied


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-min", type=float, default=14.0, help="total, all calls together")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--smoke", action="store_true", help="tiny model and data on the CPU (CI)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true", help="rerun parts whose results exist")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms (slower on CUDA)")
    parser.add_argument("--export", type=Path, help="also write the results bundle here (after every part)")
    parser.add_argument("--data-root", help="a folder of .py files instead of the stdlib (see data.py)")
    args = parser.parse_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.perf_counter()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    out, preset = args.out, "smoke" if args.smoke else "gpu"
    device = resolve_device(args.device, args.smoke)
    log = Log(out / "run_all.log")
    state_path = out / "run_all.json"
    state = read_json(state_path) if state_path.is_file() else {}
    spent_before = state.get("spent_s", 0.0)
    state.update(budget_s=args.budget_min * 60, device=describe_device(device), preset=preset)
    state.setdefault("seconds", {})

    def remaining() -> float:
        return state["budget_s"] - spent_before - (time.perf_counter() - started)

    def finish(part: str, t0: float) -> None:
        state["seconds"][part] = round(state["seconds"].get(part, 0.0) + time.perf_counter() - t0, 1)
        state["spent_s"] = round(spent_before + time.perf_counter() - started, 1)
        write_json(state_path, state)
        log(f"[{part}] {state['seconds'][part]:.1f} s (planned {state['plan']['predicted_s'].get(part, '-')} s); "
            f"{remaining():.0f} s of the budget left")
        if args.export:  # after every part: a run killed at a time limit still hands back its results
            write_summary(out, state, args.smoke)
            export(out, args.export)

    log(f"run_all on {state['device']}, budget {state['budget_s']:.0f} s "
        f"({spent_before:.0f} s spent before), parts {parts}")
    t0 = time.perf_counter()
    data_config = SMOKE_DATA if args.smoke else data.DataConfig()
    if args.data_root:
        data_config = dataclasses.replace(data_config, root=args.data_root)
    corpus = data.load_corpus(data_config)
    state["corpus"], state["data_root"] = corpus.info, args.data_root
    log(f"[data] {corpus.info}")
    shape = SMOKE_SHAPE if args.smoke else plan.Shape()
    state["shape"] = asdict(shape)
    if "plan" not in state or args.force and "pretrain" in parts:
        measured = measure_machine(preset, corpus, device, steps=2 if args.smoke else 10)
        spec, cfg = SPECS[preset], TRAIN_CONFIGS[preset]
        reserve = MINILM_RESERVE_S + MARGIN * state["budget_s"]
        the_plan = plan.make_plan(remaining() - reserve, measured, train_bytes=corpus.train.numel(),
                                  tokens_per_step=cfg.batch * spec.seq,
                                  default_tokens=DEFAULT_PRETRAIN_TOKENS[preset],
                                  max_epochs=MAX_PRETRAIN_EPOCHS, shape=shape)
        state.update(measured=asdict(measured), plan=the_plan.to_json(), fractions={})
        log(f"[plan] measured {measured}; {the_plan}")
    finish("data+plan", t0)

    checkpoint_path = out / "pretrain" / "dense.pt"
    for part in parts:
        if (out / RESULT_FILE[part]).is_file() and not args.force:
            log(f"[{part}] done before, skipped (--force reruns it)")
            continue
        t0 = time.perf_counter()
        log(f"[{part}] starting, {remaining():.0f} s of the budget left")
        if part == "pretrain":
            pretrain(out / "pretrain", preset=preset, tokens=state["plan"]["pretrain_tokens"], seed=0,
                     device=device, evals=shape.pretrain_evals, corpus=corpus,
                     data_config=data_config, log=log)
        elif part in ("compare", "ablations"):
            if not checkpoint_path.is_file():
                log(f"[{part}] no checkpoint at {checkpoint_path}: run the pretrain part first")
                return 1
            frac = fraction(part, state, remaining() - reserved_after(part, state, out), args.smoke)
            if frac == 0.0:
                log(f"[{part}] skipped: not even a tenth of it fits the remaining budget")
                continue
            checkpoint = Checkpoint.load(checkpoint_path, corpus)
            if part == "compare":
                compare_mod.compare(checkpoint, out / "compare", extra_frac=frac, evals=shape.compare_evals,
                                    device=device, log=log)
            else:
                ablations_mod.ablations(checkpoint, out / "ablations", extra_frac=frac,
                                        evals=shape.ablation_evals, device=device, log=log)
        else:
            minilm_mod.minilm(out / "minilm", device=device, log=log,
                              **(minilm_mod.SMOKE if args.smoke else {}))
        finish(part, t0)

    summary = write_summary(out, state, args.smoke)
    total = sum(state["seconds"].values())
    log("\n".join(["", "part times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in state["seconds"].items())
                   + f"; total {total:.1f} of a {state['budget_s']:.0f} s budget", f"summary: {summary}"]))
    if args.export:
        log("exported " + ", ".join(str(p) for p in export(out, args.export)))
    return 0


def reserved_after(part: str, state: dict, out: Path) -> float:
    """Seconds to keep for the parts after `part` that have not run yet, and the margin."""
    later = PARTS[PARTS.index(part) + 1:]
    predicted = state["plan"]["predicted_s"]
    keep = sum(predicted.get(p, 0.0) for p in later if not (out / RESULT_FILE[p]).is_file())
    keep += MINILM_RESERVE_S if not (out / RESULT_FILE["minilm"]).is_file() else 0.0
    return keep + MARGIN * state["budget_s"]


def fraction(part: str, state: dict, remaining_s: float, smoke: bool) -> float:
    """The planned extra-FLOPs fraction of compare/ablations, scaled down if the time left for
    it (`remaining_s`) is less than planned."""
    key = {"compare": "compare_frac", "ablations": "ablation_frac"}[part]
    planned = state["plan"][key]
    if smoke:
        frac = planned
    else:
        measured = plan.Measured(**state["measured"])
        fixed = plan.fixed_seconds(measured, plan.Shape(**state["shape"]))[part]
        frac = plan.scale_to_fit(planned, state["plan"]["predicted_s"][part], fixed, remaining_s)
    state.setdefault("fractions", {})[part] = frac
    return frac


if __name__ == "__main__":
    raise SystemExit(main())
