"""The paper's ablations, short runs from the same dense checkpoint, same plot style.

    python examples/upcycling/ablations.py --checkpoint runs/h100/pretrain/dense.pt --out runs/h100/ablations
    python examples/upcycling/ablations.py --checkpoint /tmp/pre/dense.pt --out /tmp/abl --smoke   # CPU

One seed (0), extra training FLOPs = 0.2 x pretraining by default. The baseline is the
comparison's upcycled model (E=8, top-2, renormalised, copied experts, aux 0.01); each other
arm changes one thing: 4 or 16 experts; no renormalisation (softmax-then-top-k weights, which
scale each MoE output by the routed probability mass at conversion); expert-choice routing with
capacity factor 2 (each expert takes its top 2T/E tokens of the batch: the same FLOPs as top-2
on average; NOT causal, since the choice looks at every token of the batch, so its loss is not
that of a model that could generate; the paper used it in encoders only); experts drawn at
random instead of copied. Dense continuation is drawn in every panel.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    import _bootstrap  # noqa: F401

import argparse
from pathlib import Path

from upcycling import plots
from upcycling.arms import Arm, Checkpoint, run_arms
from upcycling.model import Variant
from upcycling.results import write_csv, write_json
from upcycling.train import describe_device, resolve_device

BASE = Variant()
DEFAULT_EXTRA_FRAC = 0.2
DEFAULT_EVALS = 10
SEED = 0

# panel title -> (variants in it, what the paper reported; seeds 000/001 summarise it)
ABLATIONS: dict[str, tuple[list[Variant], str]] = {
    "number of experts": (
        [Variant(num_experts=4), BASE, Variant(num_experts=16)],
        "More experts: better quality with diminishing returns (2 to 128 tried, 32 used); many "
        "experts start with a larger quality drop that needs more extra compute to recover."),
    "router weight renormalisation": (
        [BASE, Variant(normalize_weights=False)],
        "Renormalising each token's combine weights to sum to 1 (meant to soften the drop at "
        "conversion) helped vision models a little and hurt language models (the T5 decoder "
        "uses top-k routing)."),
    "routing": (
        [BASE, Variant(routing="expert_choice")],
        "Vision: top-k and expert choice match per step, expert choice is faster per unit of "
        "time. Language: expert choice (C=2) in the encoder, top-2 in the decoder, because "
        "expert choice does not match one-token autoregressive decoding."),
    "expert initialisation": (
        [BASE, Variant(expert_init="random")],
        "Copying the dense MLP into every expert is clearly better than training experts from "
        "scratch; adding noise to the copies did not help."),
}


def panel_names() -> dict[str, list[str]]:
    """{panel title: arm names}."""
    return {title: [v.label() for v in variants] for title, (variants, _) in ABLATIONS.items()}


def arms() -> list[Arm]:
    """Dense, then each distinct variant once (the baseline serves every panel)."""
    unique: list[Variant] = []
    for variants, _ in ABLATIONS.values():
        unique += [v for v in variants if v not in unique]
    return [Arm("dense", None, SEED), *[Arm(v.label(), v, SEED) for v in unique]]


def summarize(infos: list[dict], extra_frac: float, device) -> dict:
    final = {i["arm"]: i for i in infos}
    dense = final.get("dense", {}).get("final_val_bpb")
    base = final.get(BASE.label(), {}).get("final_val_bpb")
    panels = {}
    for title, (variants, paper) in ABLATIONS.items():
        entries = []
        for v in variants:
            info = final.get(v.label())
            if info is None:
                continue
            entries.append({"arm": v.label(), "final_val_bpb": info["final_val_bpb"],
                            "start_val_bpb": info["start_val_bpb"], "tokens": info["tokens"],
                            "active_params": info["active_params"], "params": info["params"],
                            "tokens_per_s": info["tokens_per_s"], "diverged": info["diverged"],
                            "vs_baseline": None if base is None else info["final_val_bpb"] - base,
                            "vs_dense": None if dense is None else info["final_val_bpb"] - dense})
        panels[title] = {"paper": paper, "ours": entries}
    return {"extra_frac": extra_frac, "seed": SEED, "dense_final_val_bpb": dense,
            "baseline": BASE.label(), "panels": panels, "device": describe_device(device)}


def markdown(summary: dict) -> str:
    lines = ["| ablation | arm | val bits/byte at start | at end | vs baseline | vs dense | "
             "extra bytes seen | bytes/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for title, panel in summary["panels"].items():
        for e in panel["ours"]:
            vs_base = "" if e["vs_baseline"] is None else f"{e['vs_baseline']:+.4f}"
            vs_dense = "" if e["vs_dense"] is None else f"{e['vs_dense']:+.4f}"
            lines.append(f"| {title} | {e['arm']} | {e['start_val_bpb']:.4f} | {e['final_val_bpb']:.4f} | "
                         f"{vs_base} | {vs_dense} | {e['tokens']:,} | {e['tokens_per_s'] or 0:,.0f} |")
    lines += ["", "What the paper reported (Komatsuzaki et al.; seeds 000, 001):", ""]
    lines += [f"* {title}: {panel['paper']}" for title, panel in summary["panels"].items()]
    return "\n".join(lines) + "\n"


def ablations(checkpoint: Checkpoint, out: Path, *, extra_frac: float = DEFAULT_EXTRA_FRAC,
              evals: int = DEFAULT_EVALS, device, log=print) -> dict:
    rows, infos = run_arms(checkpoint, arms(), extra_frac=extra_frac, evals=evals, device=device,
                           out_csv=out / "curves.csv", log=log)
    write_csv(out / "arms.csv", infos)
    summary = summarize(infos, extra_frac, device)
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary))
    plots.ablations(rows, panel_names(), out / "ablations.png", baseline=BASE.label())
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="dense.pt written by train.py")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--extra-frac", type=float, default=DEFAULT_EXTRA_FRAC)
    parser.add_argument("--evals", type=int, default=DEFAULT_EVALS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="run on the CPU")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, args.smoke)
    ablations(Checkpoint.load(args.checkpoint), args.out, extra_frac=args.extra_frac, evals=args.evals,
              device=device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
