"""Train an upcycled Llama-style model on several GPUs: FSDP2 (+ expert parallelism), torchrun.

    torchrun --standalone --nproc_per_node=2 examples/distributed/train.py --out runs/dist [--mode fsdp_ep]
    torchrun --standalone --nproc_per_node=2 examples/distributed/train.py --out /tmp/dist --smoke  # CPU, gloo

The model is examples/upcycling's byte-level Llama (d=512, 8 layers, SwiGLU d_ff=1536; 27.5 M
parameters dense), upcycled with every other MLP as 8 experts, top-2 (93.6 M), starting from
`--dense-checkpoint` (e.g. the dense model examples/upcycling/train.py pretrained) or from a
fresh initialisation. It trains on Python's standard library as bytes (`upcycling.data`): AdamW
(beta2 0.95, weight decay 0.1 on matrices), clipping 1.0, linear warm-up then cosine decay,
global batch `--batch` x 512 bytes split over the ranks, bf16 compute with float32 master
weights on GPUs (float32 on the CPU). Every `--eval-every` steps it prints the validation loss
in bits per byte, tokens/s and the balance of the first MoE layer (global loads). At the end
it writes the sharded checkpoint (`upcycle_fx.distributed.save_sharded`: model and optimizer)
to OUT/ckpt and the curve to OUT/train.json. `--resume` continues from OUT/ckpt.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from upcycle_fx import distributed as ud
from upcycling import data
from upcycling.model import SPECS, Variant, build_dense, describe, load_checkpoint, upcycle

from dist_common import Runtime, Trainer, mean_over_ranks, setup, shard, teardown, timer, write_json

LN2 = math.log(2.0)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def balance(loads: list[list[int]]) -> float:
    """max / mean of the first MoE layer's global per-expert load (1.0: perfectly balanced)."""
    first = torch.tensor(loads[0], dtype=torch.float64)
    return float(first.max() / first.mean())


def evaluate(trainer: Trainer, batches, rt: Runtime) -> float:
    losses = [trainer.evaluate(shard(x, rt, trainer.mode).to(rt.device), shard(y, rt, trainer.mode).to(rt.device))
              for x, y in batches]
    return sum(losses) / len(losses) / LN2


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", choices=("fsdp", "fsdp_ep"), default="fsdp_ep")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="global batch (sequences of 512 bytes)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--dense-checkpoint", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.eval_every, args.warmup = 6, 4, 3, 2
    rt = setup(smoke=args.smoke)
    spec = SPECS["smoke" if args.smoke else "gpu"]
    corpus = data.load_corpus(data.DataConfig(val_percent=10, max_files=40) if args.smoke else data.DataConfig())
    dense = load_checkpoint(args.dense_checkpoint)[0] if args.dense_checkpoint else build_dense(spec, seed=0)
    model = upcycle(dense, Variant(), seed=0)
    facts = describe(model, spec)
    dtype = torch.bfloat16 if rt.device.type == "cuda" else torch.float32
    trainer = Trainer(model, args.mode, rt, dtype, lr=args.lr)
    start_step = 0
    if args.resume and (args.out / "ckpt").exists():
        ud.load_sharded(trainer.model, args.out / "ckpt", optimizer=trainer.optimizer)
        start_step = int(json.loads((args.out / "train.json").read_text())["steps_done"])
    batches = data.TrainBatches(corpus.train, args.batch, spec.seq, seed=0, device="cpu")
    for _ in range(start_step):  # the batches an uninterrupted run would have drawn
        batches.next()
    val = data.validation_batches(corpus.val, 2 if args.smoke else 4, args.batch, spec.seq, "cpu")
    if rt.is_main:
        print(f"{args.mode} on {rt.world} ranks ({rt.device.type}): {facts['params']:,} parameters, "
              f"{facts['active_params']:,.0f} active per token; global batch {args.batch} x {spec.seq}", flush=True)
    curve = []
    clock, window_steps = timer(rt.device), 0
    for step in range(start_step, args.steps):
        for group in trainer.optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        x, y = batches.next()
        loss, aux = trainer.step(shard(x, rt, args.mode).to(rt.device), shard(y, rt, args.mode).to(rt.device))
        window_steps += 1
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            elapsed = timer(rt.device) - clock
            row = {"step": step + 1, "train_bpb": mean_over_ranks(loss, args.mode) / LN2, "aux": float(aux),
                   "val_bpb": evaluate(trainer, val, rt), "balance": balance(trainer.expert_loads()),
                   "tokens_per_s": window_steps * args.batch * spec.seq / elapsed}
            curve.append(row)
            if rt.is_main:
                print(f"step {row['step']:5d}  train {row['train_bpb']:.3f} bpb  val {row['val_bpb']:.3f} bpb  "
                      f"aux {row['aux']:.4f}  max/mean load {row['balance']:.2f}  "
                      f"{row['tokens_per_s']:,.0f} tokens/s", flush=True)
            clock, window_steps = timer(rt.device), 0
    ud.save_sharded(trainer.model, args.out / "ckpt", optimizer=trainer.optimizer)
    if rt.is_main:
        write_json(args.out / "train.json", {"mode": args.mode, "world": rt.world, "steps_done": args.steps,
                                             "spec": asdict(spec), "batch": args.batch, "lr": args.lr,
                                             "model": facts, "curve": curve, "checkpoint": str(args.out / "ckpt")})
    teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
