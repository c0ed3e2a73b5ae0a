"""The training loop (pretraining and continuations) and the dense pretraining command.

    python examples/upcycling/train.py --out runs/h100/pretrain [--tokens N]   # CUDA, bf16
    python examples/upcycling/train.py --out /tmp/pre --smoke                  # CPU, tiny

Training: AdamW (beta2 0.95, weight decay 0.1 on matrices), gradient clipping 1.0, batch 64 x 512
bytes, the paper's inverse-square-root learning rate after a linear warmup, so continuing from
the checkpoint just carries on the step count (the paper upcycles that way: same batch size,
schedule and weight decay). A continuation starts AdamW's moments afresh (the paper found that
reusing the optimizer state did not help language models) and so ramps the rate up again over
`rewarm_steps`; dense and upcycled arms are treated the same. Loss: cross-entropy in nats per
byte (+ `upcycle_fx.aux_loss`); we report bits per byte (nats / ln 2).

A run gets a FLOPs budget and takes floor(budget / FLOPs per step) steps, evaluating at step 0,
each time another `budget / evals` FLOPs have been spent, and at the end, on a fixed set of
validation windows (`data.validation_batches`).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:
    import _bootstrap  # noqa: F401

import argparse
import copy
import dataclasses
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import upcycle_fx

from upcycling import data, plots
from upcycling.model import SPECS, ModelSpec, build_dense, describe, flops_per_token, save_checkpoint
from upcycling.precision import MasterWeights
from upcycling.results import write_csv, write_json

LN2 = math.log(2.0)


@dataclass(frozen=True)
class TrainConfig:
    batch: int = 64
    lr: float = 2e-3
    warmup_steps: int = 300
    rewarm_steps: int = 50
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_batches: int = 8


TRAIN_CONFIGS = {
    "gpu": TrainConfig(),
    "smoke": TrainConfig(batch=8, lr=3e-3, warmup_steps=10, rewarm_steps=3, eval_batches=2),
}
# Pretraining length: 100 M bytes (about 3 passes over the stdlib with its tests), at most
# MAX_PRETRAIN_EPOCHS passes over whatever the corpus is on the machine at hand.
DEFAULT_PRETRAIN_TOKENS = {"gpu": 100_000_000, "smoke": 24_000}
MAX_PRETRAIN_EPOCHS = 3.0
SMOKE_DATA = data.DataConfig(val_percent=10, max_files=40)


def resolve_device(name: str = "auto", smoke: bool = False) -> torch.device:
    """`auto`: CUDA if present. Smoke runs use the CPU with one thread: their tiny matrices gain
    nothing from threads, and on a busy CI machine threads waiting for each other made steps
    10x slower."""
    if smoke:
        torch.set_num_threads(1)
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (see precision.py), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def learning_rate(cfg: TrainConfig, step: int, rewarm_from: int | None = None) -> float:
    """Linear warmup, then peak x sqrt(warmup / step); x a linear ramp after `rewarm_from`."""
    n = step + 1
    lr = cfg.lr * min(n / cfg.warmup_steps, math.sqrt(cfg.warmup_steps / n))
    if rewarm_from is not None:
        lr *= min(1.0, (step - rewarm_from + 1) / cfg.rewarm_steps)
    return lr


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x, use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    """Mean validation loss (nats per byte) over the fixed batches."""
    was_training = model.training
    model.eval()
    total = sum(_loss(model, x, y) for x, y in batches) / len(batches)
    model.train(was_training)
    return float(total)


@dataclass
class RunResult:
    rows: list[dict]                 # one per evaluation
    model: nn.Module                 # the float32 master model after training
    info: dict = field(default_factory=dict)


def eval_steps(budget_flops: float, step_flops: float, evals: int) -> list[int]:
    """Step 0, the last step, and the first step at or past each k x budget / evals FLOPs."""
    steps = int(budget_flops // step_flops)
    marks = {min(steps, math.ceil(k * budget_flops / evals / step_flops - 1e-9)) for k in range(1, evals + 1)}
    return sorted({0, steps} | marks)


class Stepper:
    """One model's optimizer, batches and training step (shared by `run` and `measure`)."""

    def __init__(self, master: nn.Module, spec: ModelSpec, cfg: TrainConfig, corpus: data.Corpus, *,
                 seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self.master = master.to(device).train()
        self.weights = MasterWeights(self.master, dtype)
        self.model = self.weights.work.train()
        self.cfg, self.device = cfg, device
        self.optimizer = torch.optim.AdamW(_param_groups(self.master, cfg.weight_decay), lr=cfg.lr,
                                           betas=(0.9, cfg.beta2), fused=device.type == "cuda")
        self.batches = data.TrainBatches(corpus.train, cfg.batch, spec.seq, seed, device)

    def step(self, lr: float) -> torch.Tensor:
        """One optimizer step at learning rate `lr`; returns the task loss (no host sync)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batches.next()
        loss = _loss(self.model, x, y)
        (loss + upcycle_fx.aux_loss(self.model)).backward()
        self.weights.sync_grads()
        torch.nn.utils.clip_grad_norm_(self.weights.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.weights.work is self.master)
        self.weights.publish()
        return loss.detach()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run(master: nn.Module, spec: ModelSpec, cfg: TrainConfig, corpus: data.Corpus, *,
        budget_flops: float, seed: int, device: torch.device, dtype: torch.dtype,
        start_step: int = 0, continuation: bool = False, evals: int = 16,
        label: str = "", log=print) -> RunResult:
    """Train `master` (float32) for `budget_flops` FLOPs; returns the evaluation rows."""
    stepper = Stepper(master, spec, cfg, corpus, seed=seed, device=device, dtype=dtype)
    fpt = flops_per_token(master, spec)
    tokens_per_step = cfg.batch * spec.seq
    step_flops = fpt * tokens_per_step
    marks = eval_steps(budget_flops, step_flops, evals)
    steps, marks = marks[-1], set(marks)
    val = data.validation_batches(corpus.val, cfg.eval_batches, cfg.batch, spec.seq, device)
    rewarm_from = start_step if continuation else None
    rows: list[dict] = []
    train_sum, train_count, train_seconds = torch.zeros((), device=device), 0, 0.0
    clock = time.perf_counter()
    for step in range(steps + 1):
        if step in marks:
            stepper.synchronize()
            train_seconds += time.perf_counter() - clock
            train_loss = float(train_sum) / train_count if train_count else None
            val_loss = evaluate(stepper.model, val)
            rows.append({"step": step, "tokens": step * tokens_per_step, "flops": step * step_flops,
                         "val_loss": val_loss, "val_bpb": val_loss / LN2,
                         "train_bpb": None if train_loss is None else train_loss / LN2,
                         "lr": learning_rate(cfg, start_step + step, rewarm_from),
                         "train_seconds": round(train_seconds, 3)})
            log(f"  {label} step {step:5d}/{steps} {step * step_flops:.3e} FLOPs "
                f"val {val_loss / LN2:.4f} bpb"
                + ("" if train_loss is None else f" train {train_loss / LN2:.4f} bpb"))
            train_sum.zero_()
            train_count = 0
            if not math.isfinite(val_loss) or (train_loss is not None and not math.isfinite(train_loss)):
                rows[-1]["diverged"] = True
                log(f"  {label}: loss is not finite, stopping this run")
                break
            clock = time.perf_counter()
        if step == steps:
            break
        train_sum += stepper.step(learning_rate(cfg, start_step + step, rewarm_from))
        train_count += 1
    done = rows[-1]["step"]
    info = {**describe(master, spec), "steps": done, "tokens": done * tokens_per_step,
            "flops": done * step_flops, "train_seconds": train_seconds,
            "tokens_per_s": done * tokens_per_step / train_seconds if train_seconds else None,
            "budget_flops": budget_flops, "diverged": bool(rows[-1].get("diverged", False))}
    master.cpu()
    return RunResult(rows, master, info)


def measure(master: nn.Module, spec: ModelSpec, cfg: TrainConfig, corpus: data.Corpus, *,
            device: torch.device, steps: int = 10, warmup: int = 3) -> dict:
    """Training throughput (tokens/s after `warmup` steps) and the time of one evaluation.
    Trains a throwaway copy: used to plan a time budget (plan.py)."""
    stepper = Stepper(copy.deepcopy(master), spec, cfg, corpus, seed=0, device=device,
                      dtype=default_dtype(device))
    for _ in range(warmup):
        stepper.step(cfg.lr * 0.1)
    stepper.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        stepper.step(cfg.lr * 0.1)
    stepper.synchronize()
    train_s = time.perf_counter() - start
    val = data.validation_batches(corpus.val, cfg.eval_batches, cfg.batch, spec.seq, device)
    evaluate(stepper.model, val)
    start = time.perf_counter()
    evaluate(stepper.model, val)
    eval_s = time.perf_counter() - start
    del stepper
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"tokens_per_s": steps * cfg.batch * spec.seq / train_s, "eval_seconds": eval_s,
            "flops_per_token": flops_per_token(master, spec)}


def pretrain_tokens(requested: int | None, preset: str, corpus: data.Corpus, cfg: TrainConfig,
                    spec: ModelSpec) -> int:
    """The token budget: requested (or the preset's default), at most MAX_PRETRAIN_EPOCHS
    passes over the training bytes, rounded down to whole steps."""
    tokens = requested or DEFAULT_PRETRAIN_TOKENS[preset]
    tokens = min(tokens, int(MAX_PRETRAIN_EPOCHS * corpus.train.numel()))
    per_step = cfg.batch * spec.seq
    return max(per_step, tokens // per_step * per_step)


def pretrain(out: Path, *, preset: str, tokens: int | None, seed: int, device: torch.device,
             evals: int = 20, corpus: data.Corpus | None = None, data_config: data.DataConfig | None = None,
             log=print) -> dict:
    """Train the dense model from scratch and save `out/dense.pt` with its curve and plot."""
    spec, cfg = SPECS[preset], TRAIN_CONFIGS[preset]
    data_config = data_config or (SMOKE_DATA if preset == "smoke" else data.DataConfig())
    corpus = corpus or data.load_corpus(data_config)
    tokens = pretrain_tokens(tokens, preset, corpus, cfg, spec)
    model = build_dense(spec, seed)
    budget = flops_per_token(model, spec) * tokens
    log(f"pretraining {describe(model, spec)['params']:,} parameters on {tokens:,} bytes "
        f"({tokens / corpus.train.numel():.2f} epochs of {corpus.train.numel():,}) on {device}")
    result = run(model, spec, cfg, corpus, budget_flops=budget, seed=seed, device=device,
                 dtype=default_dtype(device), evals=evals, label="dense", log=log)
    summary = {**result.info, "seed": seed, "preset": preset, "epochs": result.info["tokens"] / corpus.train.numel(),
               "final_val_bpb": result.rows[-1]["val_bpb"], "spec": asdict(spec),
               "train_config": asdict(cfg), "corpus": corpus.info, "device": describe_device(device)}
    meta = {"step": result.info["steps"], "tokens": result.info["tokens"], "flops": result.info["flops"],
            "seed": seed, "preset": preset, "train_config": asdict(cfg),
            "data_config": asdict(data_config), "corpus_sha256": corpus.info["sha256"],
            "final_val_bpb": summary["final_val_bpb"]}
    save_checkpoint(out / "dense.pt", result.model, spec, meta)
    write_csv(out / "curve.csv", result.rows)
    write_json(out / "summary.json", summary)
    plots.pretraining(result.rows, out / "pretrain.png")
    return summary


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu (threads: {torch.get_num_threads()}), torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few files, CPU")
    parser.add_argument("--tokens", type=int, help="pretraining bytes (default: 100 M, <= 3 epochs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-root", help="a folder of .py files instead of the stdlib (see data.py)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device, args.smoke)
    data_config = SMOKE_DATA if args.smoke else data.DataConfig()
    if args.data_root:
        data_config = dataclasses.replace(data_config, root=args.data_root)
    summary = pretrain(args.out, preset="smoke" if args.smoke else "gpu", tokens=args.tokens,
                       seed=args.seed, device=device, data_config=data_config)
    print(f"final validation {summary['final_val_bpb']:.4f} bits/byte after {summary['tokens']:,} bytes "
          f"({summary['tokens_per_s'] or 0:,.0f} bytes/s); checkpoint {args.out / 'dense.pt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
