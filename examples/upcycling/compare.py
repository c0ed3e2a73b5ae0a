"""The core result: from one dense checkpoint, continue dense vs upcycled for the same FLOPs.

    python examples/upcycling/compare.py --checkpoint runs/h100/pretrain/dense.pt --out runs/h100/compare
    python examples/upcycling/compare.py --checkpoint /tmp/pre/dense.pt --out /tmp/cmp --smoke   # CPU

Arms (Komatsuzaki et al., Figure 1, at small scale): (a) the dense model, (b) the model
upcycled with `pattern="every_other_mlp"`, 8 experts, top-2, renormalised weights, aux loss
0.01; seeds 0, 1, 2 each; extra training FLOPs = 0.4 x the pretraining FLOPs by default (the
paper's regime: under 40% extra). Writes curves.csv (every evaluation of every arm),
arms.csv (one line per arm), summary.json, summary.md and compare.png.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    import _bootstrap  # noqa: F401

import argparse
import statistics
from pathlib import Path

from upcycling import plots
from upcycling.arms import Arm, Checkpoint, run_arms
from upcycling.model import Variant
from upcycling.results import write_csv, write_json
from upcycling.train import describe_device, resolve_device

VARIANT = Variant()                   # E=8, top-2, renormalised, copies, aux 0.01
UPCYCLED = VARIANT.label()
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_EXTRA_FRAC = 0.4
DEFAULT_EVALS = 16


def arms_for(seeds) -> list[Arm]:
    """Seed by seed, dense then upcycled (a part cut short still has complete pairs)."""
    return [arm for s in seeds for arm in (Arm("dense", None, s), Arm(UPCYCLED, VARIANT, s))]


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def paired_gaps(rows: list[dict]) -> list[dict]:
    """At each evaluation point k: dense minus upcycled bits/byte, per seed and on average
    (> 0: upcycled is better). Both arms evaluate at the first step past k x budget / evals."""
    arms = plots.by_arm(rows)
    dense = {r[0]["seed"]: r for r in arms.get("dense", [])}
    pairs = [(dense[r[0]["seed"]], r) for r in arms.get(UPCYCLED, []) if r[0]["seed"] in dense]
    if not pairs:
        return []
    n = min(min(len(d), len(u)) for d, u in pairs)
    out = []
    for i in range(n):
        gaps = [d[i]["val_bpb"] - u[i]["val_bpb"] for d, u in pairs]
        out.append({"point": i, "extra_flops": pairs[0][1][i]["flops"],
                    "dense_bpb": statistics.fmean(d[i]["val_bpb"] for d, _ in pairs),
                    "upcycled_bpb": statistics.fmean(u[i]["val_bpb"] for _, u in pairs),
                    "gap_mean": statistics.fmean(gaps),
                    "gap_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
                    "seeds_upcycled_better": sum(g > 0 for g in gaps), "seeds": len(gaps)})
    return out


def verdict(gaps: list[dict], budget: float) -> str:
    """The result in one plain paragraph, whatever it is."""
    if not gaps:
        return "No paired dense/upcycled runs finished."
    end = gaps[-1]
    where = "below" if end["gap_mean"] > 0 else "above"
    text = (f"After {end['extra_flops']:.3g} extra training FLOPs the upcycled model ends {where} dense "
            f"continuation: {end['upcycled_bpb']:.4f} vs {end['dense_bpb']:.4f} bits/byte (gap "
            f"{end['gap_mean']:+.4f} ± {end['gap_std']:.4f}, better in {end['seeds_upcycled_better']} "
            f"of {end['seeds']} seeds).")
    lead = next((g for i, g in enumerate(gaps) if i > 0 and all(h["gap_mean"] > 0 for h in gaps[i:])), None)
    if lead is not None:
        text += f" It leads from {lead['extra_flops'] / budget:.0%} of the extra budget on."
    else:
        text += " It does not stay ahead of dense continuation."
    middle = gaps[len(gaps) // 2]
    favour = "the upcycled model's" if end["gap_mean"] > middle["gap_mean"] else "dense continuation's"
    text += (f" The gap (dense minus upcycled) moves in {favour} favour from {middle['gap_mean']:+.4f} "
             f"at {middle['extra_flops'] / budget:.0%} of the budget to {end['gap_mean']:+.4f} at the end.")
    return text


def summarize(rows: list[dict], infos: list[dict], checkpoint: Checkpoint, extra_frac: float, device) -> dict:
    budget = extra_frac * checkpoint.meta["flops"]
    gaps = paired_gaps(rows)
    per_arm = {}
    for name in ("dense", UPCYCLED):
        mine = [i for i in infos if i["arm"] == name]
        if not mine:
            continue
        first = mine[0]
        per_arm[name] = {
            "final_val_bpb": _stats([i["final_val_bpb"] for i in mine]),
            "start_val_bpb": _stats([i["start_val_bpb"] for i in mine]),
            "tokens": first["tokens"], "steps": first["steps"], "flops": first["flops"],
            "epochs": first["epochs"], "params": first["params"], "active_params": first["active_params"],
            "flops_per_token": first["flops_per_token"],
            "tokens_per_s": statistics.fmean(i["tokens_per_s"] or 0 for i in mine),
            "seconds": sum(i["seconds"] for i in mine)}
    return {"verdict": verdict(gaps, budget), "extra_frac": extra_frac, "extra_flops_budget": budget,
            "pretrain_flops": checkpoint.meta["flops"], "pretrain_tokens": checkpoint.meta["tokens"],
            "checkpoint_val_bpb": checkpoint.meta["final_val_bpb"], "arms": per_arm, "gaps": gaps,
            "device": describe_device(device)}


def markdown(summary: dict) -> str:
    lines = ["| arm | params | active / byte | FLOPs / byte | extra bytes seen | extra FLOPs | "
             "bytes/s | val bits/byte at start | val bits/byte at end |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a in summary["arms"].items():
        lines.append(f"| {name} | {a['params'] / 1e6:.1f} M | {a['active_params'] / 1e6:.1f} M | "
                     f"{a['flops_per_token'] / 1e6:.0f} M | {a['tokens']:,} | {a['flops']:.3g} | "
                     f"{a['tokens_per_s']:,.0f} | {a['start_val_bpb']['mean']:.4f} | "
                     f"{a['final_val_bpb']['mean']:.4f} ± {a['final_val_bpb']['std']:.4f} |")
    gap_rows = ["", "| share of extra budget | dense | upcycled | dense − upcycled (mean ± std) |",
                "|---:|---:|---:|---:|"]
    budget = summary["extra_flops_budget"]
    for g in summary["gaps"]:
        gap_rows.append(f"| {g['extra_flops'] / budget:.0%} | {g['dense_bpb']:.4f} | {g['upcycled_bpb']:.4f} | "
                        f"{g['gap_mean']:+.4f} ± {g['gap_std']:.4f} |")
    return "\n".join([summary["verdict"], "", *lines, *gap_rows]) + "\n"


def compare(checkpoint: Checkpoint, out: Path, *, seeds=DEFAULT_SEEDS, extra_frac: float = DEFAULT_EXTRA_FRAC,
            evals: int = DEFAULT_EVALS, device, log=print) -> dict:
    rows, infos = run_arms(checkpoint, arms_for(seeds), extra_frac=extra_frac, evals=evals,
                           device=device, out_csv=out / "curves.csv", log=log)
    write_csv(out / "arms.csv", infos)
    summary = summarize(rows, infos, checkpoint, extra_frac, device)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary))
    plots.comparison(rows, out / "compare.png", UPCYCLED)
    log(summary["verdict"])
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="dense.pt written by train.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--extra-frac", type=float, default=DEFAULT_EXTRA_FRAC,
                        help="extra training FLOPs per arm, as a fraction of the pretraining FLOPs")
    parser.add_argument("--evals", type=int, default=DEFAULT_EVALS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="run on the CPU")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, args.smoke)
    compare(Checkpoint.load(args.checkpoint), args.out, seeds=args.seeds, extra_frac=args.extra_frac,
            evals=args.evals, device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
