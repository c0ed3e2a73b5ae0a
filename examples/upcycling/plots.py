"""The figures: validation bits/byte against training FLOPs, one style for every experiment.

    python examples/upcycling/plots.py --out runs/h100      # redraw every PNG from the CSVs

Each continuation arm is a line (mean over its seeds, a band from the lowest to the highest
seed); dense continuation is always drawn, in black, as the reference.
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    import _bootstrap  # noqa: F401

import argparse
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from upcycling.results import read_csv  # noqa: E402

DENSE = "dense"
COLORS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]


def by_arm(rows: list[dict]) -> dict[str, list[list[dict]]]:
    """{arm: [rows of seed a, rows of seed b, ...]} in first-seen order, each by step."""
    grouped: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        grouped[row["arm"]][row["seed"]].append(row)
    return {arm: [sorted(r, key=lambda x: x["step"]) for r in seeds.values()] for arm, seeds in grouped.items()}


def mean_curve(runs: list[list[dict]], key: str = "val_bpb") -> tuple[list[float], list[float], list[float], list[float]]:
    """x (FLOPs), mean, min, max over runs, on their common evaluation points (runs of one arm
    share them: same model shape, same budget)."""
    n = min(len(r) for r in runs)
    xs = [runs[0][i]["flops"] for i in range(n)]
    cols = [[r[i][key] for r in runs] for i in range(n)]
    return xs, [sum(c) / len(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def colors_for(names: list[str]) -> dict[str, str]:
    """Dense in black, the others in palette order: one colour per arm across panels."""
    palette = iter(COLORS)
    return {name: "black" if name == DENSE else next(palette) for name in names}


def draw_arms(ax, arms: dict[str, list[list[dict]]], names: list[str], title: str,
              colors: dict[str, str]) -> None:
    """Mean line and seed band of each named arm."""
    for name in names:
        if name not in arms:
            continue
        xs, mean, lo, hi = mean_curve(arms[name])
        seeds = len(arms[name])
        label = f"{name} ({seeds} seeds)" if seeds > 1 else name
        ax.plot(xs, mean, color=colors[name], lw=1.8, label=label)
        if seeds > 1:
            ax.fill_between(xs, lo, hi, color=colors[name], alpha=0.18, lw=0)
    ax.set_title(title)
    _flops_axes(ax, arms)
    ax.set_ylabel("validation bits per byte")
    ax.legend(fontsize=8)
    _zoom(ax, [arms[n] for n in names if n in arms])


def _flops_axes(ax, arms: dict[str, list[list[dict]]]) -> None:
    """x: extra FLOPs; top axis: the same as a share of the pretraining FLOPs."""
    ax.set_xlabel("extra training FLOPs after the dense checkpoint")
    ax.grid(alpha=0.3)
    row = next((r for runs in arms.values() for run in runs for r in run if r["flops"] > 0), None)
    if row is not None and row.get("total_flops"):
        pre = row["total_flops"] - row["flops"]
        top = ax.secondary_xaxis("top", functions=(lambda x: x / pre, lambda f: f * pre))
        top.set_xlabel("share of the pretraining FLOPs", fontsize=8)


def _zoom(ax, groups) -> None:
    """Clip the y axis to the range after the first evaluation, so that an arm whose loss
    jumps at conversion (random experts) does not flatten the others."""
    values = [r[i]["val_bpb"] for runs in groups for r in runs for i in range(1, len(r))]
    if values:
        lo, hi = min(values), max(values)
        pad = 0.08 * (hi - lo or 1.0)
        ax.set_ylim(lo - pad, hi + pad)


def pretraining(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["flops"] for r in rows], [r["val_bpb"] for r in rows], "k-", label="validation")
    train = [(r["flops"], r["train_bpb"]) for r in rows if r.get("train_bpb") is not None]
    if train:
        ax.plot(*zip(*train), color="tab:gray", ls="--", label="training (mean since last point)")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("bits per byte")
    ax.set_title("dense pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def comparison(rows: list[dict], path: Path, upcycled: str) -> None:
    """Left: both arms against FLOPs. Right: dense minus upcycled, per seed and on average."""
    arms = by_arm(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    draw_arms(left, arms, [DENSE, upcycled], "continuing the dense checkpoint", colors_for([DENSE, upcycled]))
    dense_runs = {r[0]["seed"]: r for r in arms.get(DENSE, [])}
    gaps = []
    for run in arms.get(upcycled, []):
        base = dense_runs.get(run[0]["seed"])
        if base is None:
            continue
        n = min(len(run), len(base))
        xs = [run[i]["flops"] for i in range(n)]
        gap = [base[i]["val_bpb"] - run[i]["val_bpb"] for i in range(n)]
        gaps.append(gap)
        right.plot(xs, gap, color="tab:red", lw=0.8, alpha=0.5)
    if gaps:
        n = min(len(g) for g in gaps)
        xs = [arms[upcycled][0][i]["flops"] for i in range(n)]
        right.plot(xs, [sum(g[i] for g in gaps) / len(gaps) for i in range(n)], color="tab:red", lw=2,
                   label="mean over seeds (thin: each seed)")
    right.axhline(0, color="black", lw=1)
    right.set_title("dense minus upcycled (> 0: upcycled is better)")
    _flops_axes(right, arms)
    right.set_ylabel("validation bits per byte")
    right.legend(fontsize=8)
    _save(fig, path)


def ablations(rows: list[dict], panels: dict[str, list[str]], path: Path, baseline: str | None = None) -> None:
    """One panel per ablation, each with its arms and dense continuation; the baseline arm has
    the same colour in every panel."""
    arms = by_arm(rows)
    ordered = [DENSE] + ([baseline] if baseline else [])
    for names in panels.values():
        ordered += [n for n in names if n not in ordered]
    colors = colors_for(ordered)
    cols = 2
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(12, 4.8 * nrows), squeeze=False)
    for ax, (title, names) in zip(axes.flat, panels.items()):
        draw_arms(ax, arms, [DENSE, *names], title, colors)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def redraw(out: Path) -> list[Path]:
    """Redraw every figure whose CSV exists under `out` (a run_all results folder)."""
    from upcycling import ablations as ablations_mod, compare as compare_mod

    drawn = []
    if (out / "pretrain" / "curve.csv").is_file():
        pretraining(read_csv(out / "pretrain" / "curve.csv"), out / "pretrain" / "pretrain.png")
        drawn.append(out / "pretrain" / "pretrain.png")
    if (out / "compare" / "curves.csv").is_file():
        comparison(read_csv(out / "compare" / "curves.csv"), out / "compare" / "compare.png",
                   compare_mod.UPCYCLED)
        drawn.append(out / "compare" / "compare.png")
    if (out / "ablations" / "curves.csv").is_file():
        ablations(read_csv(out / "ablations" / "curves.csv"), ablations_mod.panel_names(),
                  out / "ablations" / "ablations.png", baseline=ablations_mod.BASE.label())
        drawn.append(out / "ablations" / "ablations.png")
    return drawn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a run_all results folder")
    args = parser.parse_args(argv)
    for path in redraw(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
