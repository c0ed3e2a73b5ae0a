"""Same numbers and tokens/s on W GPUs: run once with torchrun for W = 1 and once for W = 2.

    torchrun --standalone --nproc_per_node=1 examples/distributed/bench.py --out OUT
    torchrun --standalone --nproc_per_node=2 examples/distributed/bench.py --out OUT --checkpoint OUT/ckpt
    (add --smoke for a tiny CPU / gloo run)

Writes OUT/w<W>.json; `run_all.py` launches both and puts them side by side.

equivalence: a small upcycled Llama (examples/upcycling's d=512, 8 layers, bytes, E=8 top-2;
93.6 M parameters), 10 AdamW steps on the same global batches of real text (16 x 512 bytes of
Python's standard library), in each mode of `dist_common` that the world size allows:
  W=1: single fp32, single bf16 (bf16 weights + float32 master), fsdp bf16 (FSDP2 on one GPU)
  W=2: fsdp fp32, fsdp_ep fp32, fsdp bf16, fsdp_ep bf16
Learning rate 3e-4 (AdamW, no warm-up). Per step: the loss (mean over ranks = loss of the global
batch), the aux loss and the global per-expert loads of every MoE layer (a routing decision that
flips between two runs shows there first); at step 0 the gradient norms of the experts and of
all other parameters (a gradient scale error, which AdamW would hide from the losses, shows
there); the validation loss at the end. With --checkpoint, the fsdp_ep fp32
run is saved there (save_sharded) for consolidate.py.

throughput: benchmarks/train_step.py's model (12 layers, d=768, d_ff=3072, vocab 32000; 460 M
parameters upcycled with E=8 top-2), global batches of 8 x 2048 and 32 x 2048 tokens, bf16 compute,
AdamW; tokens/s of the global batch after 3 warm-up steps over 10 steps, peak memory, MFU per GPU.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401

import argparse
import gc
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

import upcycle_fx
from upcycle_fx import distributed as ud
from upcycle_fx.report import active_parameters, count_parameters
from upcycling import data
from upcycling.model import SPECS, ModelSpec, Variant, build_dense, flops_per_token, upcycle

from dist_common import (Runtime, Trainer, device_name, fresh, mean_over_ranks, set_fp32_exact, setup, shard,
                         teardown, timer, write_json)

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}   # dense bf16 tensor-core peak per GPU (SXM datasheet)
THROUGHPUT_SPEC = ModelSpec(d_model=768, layers=12, heads=12, d_ff=3072, seq=2048, vocab=32000)
SMOKE_THROUGHPUT_SPEC = ModelSpec(d_model=64, layers=4, heads=4, d_ff=128, seq=64, vocab=256)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SMOKE_DATA = data.DataConfig(val_percent=10, max_files=40)
FP32_TOLERANCE = 1e-4   # relative, float32 without TF32 (reduction order differs between layouts)
EQUIVALENCE_LR = 3e-4
THROUGHPUT_BATCHES = (8, 32)   # global batch rows (x 2048 tokens)


def equivalence_runs(world: int) -> list[tuple[str, str]]:
    if world == 1:
        return [("single", "fp32"), ("single", "bf16"), ("fsdp", "bf16")]
    return [("fsdp", "fp32"), ("fsdp_ep", "fp32"), ("fsdp", "bf16"), ("fsdp_ep", "bf16")]


def throughput_runs(world: int) -> list[tuple[str, str]]:
    return [("single", "bf16"), ("fsdp", "bf16")] if world == 1 else [("fsdp", "bf16"), ("fsdp_ep", "bf16")]


def release(rt: Runtime) -> None:
    gc.collect()
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(rt.device)
    torch.distributed.barrier()


def equivalence(rt: Runtime, args) -> list[dict]:
    spec = SPECS["smoke" if args.smoke else "gpu"]
    data_config = SMOKE_DATA if args.smoke else data.DataConfig()
    corpus = data.load_corpus(data_config)
    batch = 4 if args.smoke else 16
    batches = data.TrainBatches(corpus.train, batch, spec.seq, seed=0, device="cpu")
    steps = [batches.next() for _ in range(args.equivalence_steps)]
    val_x, val_y = data.validation_batches(corpus.val, 1, batch, spec.seq, "cpu")[0]
    base = upcycle(build_dense(spec, seed=0), Variant(), seed=0)
    results = []
    for mode, dtype_name in equivalence_runs(rt.world):
        set_fp32_exact(dtype_name == "fp32")
        trainer = Trainer(fresh(base), mode, rt, DTYPES[dtype_name], lr=EQUIVALENCE_LR)
        row = {"mode": mode, "dtype": dtype_name, "world": rt.world, "lr": EQUIVALENCE_LR, "loss": [], "aux": [],
               "loads": []}
        start = timer(rt.device)
        for i, (x, y) in enumerate(steps):
            loss, aux = trainer.step(shard(x, rt, mode).to(rt.device), shard(y, rt, mode).to(rt.device),
                                     grad_norms=i == 0)
            row["loss"].append(mean_over_ranks(loss, mode))
            row["aux"].append(float(aux))
            row["loads"].append(trainer.expert_loads())
            if i == 0:
                row["grad_norms_step0"] = trainer.last_grad_norms
        row["seconds"] = timer(rt.device) - start
        row["val_loss"] = trainer.evaluate(shard(val_x, rt, mode).to(rt.device), shard(val_y, rt, mode).to(rt.device))
        if args.checkpoint and (mode, dtype_name) == ("fsdp_ep", "fp32"):
            ud.save_sharded(trainer.model, args.checkpoint, optimizer=trainer.optimizer)
            row["checkpoint"] = str(args.checkpoint)
            if rt.is_main:
                write_json(Path(args.checkpoint).parent / "checkpoint_expected.json",
                           {"val_loss": row["val_loss"], "spec": asdict(spec), "batch": batch, "dtype": "fp32",
                            "data": asdict(data_config), "tolerance": FP32_TOLERANCE})
        if rt.is_main:
            print(f"[w={rt.world}] {mode:8s} {dtype_name}: losses {[round(v, 4) for v in row['loss']]} "
                  f"val {row['val_loss']:.4f} ({row['seconds']:.1f} s)", flush=True)
        results.append(row)
        del trainer
        release(rt)
    set_fp32_exact(False)
    return results


def throughput(rt: Runtime, args) -> list[dict]:
    spec = SMOKE_THROUGHPUT_SPEC if args.smoke else THROUGHPUT_SPEC
    batches = (2, 4) if args.smoke else THROUGHPUT_BATCHES
    dense = build_dense(spec, seed=0)
    base = upcycle_fx.rewrite(dense, num_experts=8, top_k=2, seed=0)
    del dense
    facts = {"params": count_parameters(base), "active_params": float(active_parameters(base)),
             "flops_per_token": flops_per_token(base, spec)}
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, spec.vocab, (max(batches), spec.seq), generator=generator)
    y = torch.randint(0, spec.vocab, (max(batches), spec.seq), generator=generator)
    peak = next((v for k, v in PEAK_BF16.items() if k in device_name(rt.device)), None)
    results = []
    for mode, dtype_name in throughput_runs(rt.world):
        trainer = Trainer(fresh(base), mode, rt, DTYPES[dtype_name], lr=1e-4)
        for batch in batches:
            xs, ys = shard(x[:batch], rt, mode).to(rt.device), shard(y[:batch], rt, mode).to(rt.device)
            if rt.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(rt.device)
            for _ in range(args.warmup):
                trainer.step(xs, ys)
            start = timer(rt.device)
            for _ in range(args.timed_steps):
                trainer.step(xs, ys)
            host_seconds = (time.perf_counter() - start) / args.timed_steps   # before waiting for the GPU
            seconds = (timer(rt.device) - start) / args.timed_steps
            if args.profile and batch == batches[0]:
                profile_steps(trainer, xs, ys, rt, args.profile / f"profile_w{rt.world}_{mode}_{dtype_name}.txt")
            memory = torch.cuda.max_memory_allocated(rt.device) / 2**30 if rt.device.type == "cuda" else 0.0
            memory = max_over_ranks(memory)
            tokens_per_s = batch * spec.seq / seconds
            row = {"mode": mode, "dtype": dtype_name, "world": rt.world, "global_batch": [batch, spec.seq],
                   "step_ms": 1e3 * seconds, "host_ms": 1e3 * host_seconds, "tokens_per_s": tokens_per_s,
                   "tokens_per_s_per_gpu": tokens_per_s / rt.world, "peak_memory_gib": memory,
                   "mfu": facts["flops_per_token"] * tokens_per_s / (rt.world * peak) if peak else None, **facts}
            if rt.is_main:
                print(f"[w={rt.world}] {mode:8s} {dtype_name} batch {batch}x{spec.seq}: {row['step_ms']:.1f} ms/step, "
                      f"{tokens_per_s:,.0f} tokens/s, peak {memory:.1f} GiB", flush=True)
            results.append(row)
            del xs, ys
        del trainer
        release(rt)
    return results


def profile_steps(trainer: Trainer, xs, ys, rt: Runtime, path: Path, steps: int = 3) -> None:
    """torch.profiler over a few more steps; rank 0 writes the top operators by CPU and by GPU time
    (where a step's time goes: kernels, collectives, or host-side dispatch)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if rt.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            trainer.step(xs, ys)
        timer(rt.device)
    if rt.is_main:
        events = prof.key_averages()
        device_key = "self_device_time_total" if rt.device.type == "cuda" else "self_cpu_time_total"
        busy = sum(getattr(e, device_key) for e in events) / steps / 1e3
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{steps} steps; summed self device time per step {busy:.1f} ms\n\n"
                        + events.table(sort_by="self_cpu_time_total", row_limit=25) + "\n\n"
                        + events.table(sort_by=device_key, row_limit=25) + "\n")


def max_over_ranks(value: float) -> float:
    tensor = torch.tensor([value], dtype=torch.float64,
                          device="cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (gloo)")
    parser.add_argument("--parts", default="equivalence,throughput")
    parser.add_argument("--checkpoint", type=Path, default=None, help="save the fsdp_ep fp32 run here (W > 1)")
    parser.add_argument("--equivalence-steps", type=int, default=10)
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables of each throughput mode here")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timed-steps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        args.warmup, args.timed_steps, args.equivalence_steps = 1, 2, min(args.equivalence_steps, 3)
    rt = setup(smoke=args.smoke)
    parts = args.parts.split(",")
    payload = {"meta": {"world": rt.world, "device": device_name(rt.device), "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "upcycle_fx": upcycle_fx.__version__, "smoke": args.smoke}}
    if "equivalence" in parts:
        payload["equivalence"] = equivalence(rt, args)
    if "throughput" in parts:
        payload["throughput"] = throughput(rt, args)
    if rt.is_main:
        write_json(args.out / f"w{rt.world}.json", payload)
    teardown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
