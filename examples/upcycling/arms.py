"""Continuing one dense checkpoint several ways ("arms") for the same extra training FLOPs.

Every arm starts from the same float32 checkpoint, runs `train.run` for `extra_frac` x the
checkpoint's pretraining FLOPs with the checkpoint's training settings, and carries on its
step count (learning-rate schedule). An upcycled arm does more FLOPs per token, so it takes
fewer steps and sees fewer bytes; the CSV has both (`tokens`, `flops`) for every point.

Seeds: seed s draws the upcycled routers (`rewrite(seed=s)`) and the order of the training
windows (data seed 1000 + s, so no arm replays pretraining's order). The dense and upcycled
arms of one seed see the same windows in the same order (the upcycled one stops earlier).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from upcycling import data
from upcycling.model import ModelSpec, Variant, load_checkpoint, upcycle
from upcycling.results import write_csv
from upcycling.train import TrainConfig, default_dtype, run

DATA_SEED_OFFSET = 1_000


@dataclass(frozen=True)
class Arm:
    name: str                  # "dense" or the variant's label; the plots group by it
    variant: Variant | None    # None: continue the dense model as it is
    seed: int = 0


def arm_fields(arm: Arm) -> dict:
    """The CSV columns that say what an arm is."""
    v = arm.variant
    return {"arm": arm.name, "seed": arm.seed, "upcycled": v is not None,
            "experts": v.num_experts if v else 1, "top_k": v.top_k if v else 1,
            "routing": v.routing if v else "dense", "normalize_weights": v.normalize_weights if v else None,
            "expert_init": v.expert_init if v else None, "aux_loss_weight": v.aux_loss_weight if v else 0.0}


@dataclass
class Checkpoint:
    """A loaded dense checkpoint with what continuing it needs."""

    model: torch.nn.Module
    spec: ModelSpec
    meta: dict
    config: TrainConfig
    corpus: data.Corpus

    @classmethod
    def load(cls, path: Path, corpus: data.Corpus | None = None) -> "Checkpoint":
        model, spec, meta = load_checkpoint(path)
        corpus = corpus or data.load_corpus(data.DataConfig(**meta["data_config"]))
        expected = meta.get("corpus_sha256")
        if expected and corpus.info["sha256"] != expected:
            raise RuntimeError(f"{path} was trained on corpus {expected}, this machine's is "
                               f"{corpus.info['sha256']} (another Python version?); pretrain here first")
        return cls(model, spec, meta, TrainConfig(**meta["train_config"]), corpus)


def run_arms(checkpoint: Checkpoint, arms: list[Arm], *, extra_frac: float, evals: int,
             device: torch.device, out_csv: Path, log=print) -> tuple[list[dict], list[dict]]:
    """Run each arm; returns (evaluation rows, one summary per arm). The CSV is rewritten after
    every arm, so an interrupted run keeps what it finished."""
    budget = extra_frac * checkpoint.meta["flops"]
    rows: list[dict] = []
    infos: list[dict] = []
    for arm in arms:
        started = time.perf_counter()
        model = upcycle(checkpoint.model, arm.variant, arm.seed)
        converted = time.perf_counter() - started
        result = run(model, checkpoint.spec, checkpoint.config, checkpoint.corpus, budget_flops=budget,
                     seed=DATA_SEED_OFFSET + arm.seed, device=device, dtype=default_dtype(device),
                     start_step=checkpoint.meta["step"], continuation=True, evals=evals,
                     label=f"{arm.name} seed {arm.seed}", log=log)
        fields = arm_fields(arm)
        for row in result.rows:
            rows.append({**fields, **row, "total_flops": checkpoint.meta["flops"] + row["flops"],
                         "flops_per_token": result.info["flops_per_token"]})
        info = {**fields, **result.info, "rewrite_seconds": round(converted, 2),
                "seconds": round(time.perf_counter() - started, 2),
                "final_val_bpb": result.rows[-1]["val_bpb"], "start_val_bpb": result.rows[0]["val_bpb"],
                "epochs": result.info["tokens"] / checkpoint.corpus.train.numel()}
        infos.append(info)
        log(f"{arm.name} seed {arm.seed}: {info['final_val_bpb']:.4f} bpb after {info['tokens']:,} bytes, "
            f"{info['flops']:.3e} FLOPs, {info['tokens_per_s'] or 0:,.0f} bytes/s, {info['seconds']:.0f} s")
        write_csv(out_csv, rows)
        del model, result
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, infos
