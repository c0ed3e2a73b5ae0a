"""Fitting the whole set into a time budget: how long to pretrain, from measured throughput.

run_all measures training throughput of the dense and the upcycled model on the machine at
hand (train.measure: a few steps of each, ~10-20 s on an H100), then picks the pretraining
length P (bytes) so that every part fits the budget. The shape of the experiment is fixed; only
its scale moves: the comparison continues for `compare_frac` x the pretraining FLOPs per arm
(seeds x 2 arms), the ablations for `ablation_frac` x (1 dense + `ablation_variants` upcycled
arms). P never exceeds the preset's default nor MAX_PRETRAIN_EPOCHS passes over the data, so a
fast machine finishes early rather than overfitting. Everything the plan decides is written to
plan.json and repeated as explicit per-experiment commands.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Measured:
    dense_tokens_per_s: float
    upcycled_tokens_per_s: float
    dense_flops_per_token: float
    upcycled_flops_per_token: float
    eval_seconds: float            # one evaluation (all validation batches)
    arm_overhead_s: float          # rewrite + copies before an arm trains


@dataclass(frozen=True)
class Shape:
    """The experiment's fixed shape (defaults: the GPU run)."""

    seeds: int = 3
    compare_frac: float = 0.4
    ablation_frac: float = 0.2
    ablation_variants: int = 6     # upcycled arms of the ablations (plus one dense)
    pretrain_evals: int = 20
    compare_evals: int = 16
    ablation_evals: int = 10


@dataclass
class Plan:
    pretrain_tokens: int
    compare_frac: float
    ablation_frac: float
    predicted_s: dict
    limited_by: str               # "budget", "default length" or "epochs"

    def to_json(self) -> dict:
        return asdict(self)


def seconds_per_pretrain_token(m: Measured, shape: Shape) -> dict[str, float]:
    """Seconds each part spends per pretraining byte (its training time scales with P)."""
    dense = 1.0 / m.dense_tokens_per_s
    # an upcycled arm gets the same FLOPs, so it trains f_d / f_u bytes per pretraining byte
    upcycled = m.dense_flops_per_token / (m.upcycled_flops_per_token * m.upcycled_tokens_per_s)
    return {"pretrain": dense,
            "compare": shape.seeds * shape.compare_frac * (dense + upcycled),
            "ablations": shape.ablation_frac * (dense + shape.ablation_variants * upcycled)}


def fixed_seconds(m: Measured, shape: Shape) -> dict[str, float]:
    """Seconds each part spends whatever P is: evaluations and per-arm setup."""
    per_arm = lambda evals: (evals + 1) * m.eval_seconds + m.arm_overhead_s  # noqa: E731
    return {"pretrain": (shape.pretrain_evals + 1) * m.eval_seconds,
            "compare": 2 * shape.seeds * per_arm(shape.compare_evals),
            "ablations": (1 + shape.ablation_variants) * per_arm(shape.ablation_evals)}


def make_plan(available_s: float, m: Measured, *, train_bytes: int, tokens_per_step: int,
              default_tokens: int, max_epochs: float, shape: Shape = Shape(),
              min_steps: int = 50) -> Plan:
    """The largest pretraining length (whole steps) whose parts fit in `available_s` seconds."""
    rate = seconds_per_pretrain_token(m, shape)
    fixed = fixed_seconds(m, shape)
    by_budget = (available_s - sum(fixed.values())) / sum(rate.values())
    limits = {"budget": by_budget, "default length": default_tokens, "epochs": max_epochs * train_bytes}
    limited_by = min(limits, key=limits.get)
    tokens = max(1, int(limits[limited_by]) // tokens_per_step) * tokens_per_step
    if limited_by == "budget" and tokens < min_steps * tokens_per_step:
        need = sum(fixed.values()) + min_steps * tokens_per_step * sum(rate.values())
        raise ValueError(f"a budget of {available_s:.0f} s leaves fewer than {min_steps} pretraining "
                         f"steps on this machine; give at least {need:.0f} s")
    predicted = {part: round(fixed[part] + tokens * rate[part], 1) for part in rate}
    return Plan(tokens, shape.compare_frac, shape.ablation_frac, predicted, limited_by)


def scale_to_fit(frac: float, predicted_s: float, fixed_s: float, remaining_s: float) -> float:
    """The extra-FLOPs fraction a part can afford with `remaining_s` left (its training time is
    proportional to the fraction, its evaluations and setup are not); 0 if not even a tenth of
    the planned run fits."""
    variable = max(predicted_s - fixed_s, 1e-9)
    scale = min(1.0, (remaining_s - fixed_s) / variable)
    return frac * scale if scale >= 0.1 else 0.0
