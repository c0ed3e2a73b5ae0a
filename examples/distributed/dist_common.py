"""What the distributed example scripts share: process setup, the models, one training step.

Modes (how a model is trained; every mode sees the same global batch each step):
* `single`: one process, no torch.distributed in the model. float32, or bf16 working weights
  with float32 master weights and float32 routers (`upcycling.precision.MasterWeights`, the
  recipe of the single-GPU experiments);
* `fsdp`: `upcycle_fx.distributed.parallelize(model, mesh)`: FSDP2 over all ranks;
* `fsdp_ep`: the same with `expert_parallel=True` (experts split over all ranks, all-to-all).
For bf16 the parallel modes use MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32):
bf16 compute from float32 master weights, float32 routers, as `single` does.
"""

from __future__ import annotations

import _bootstrap  # noqa: F401  (paths, NCCL settings: before torch.distributed starts)

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.distributed.tensor import DTensor

import upcycle_fx
from upcycle_fx import distributed as ud
from upcycling.precision import MasterWeights

MODES = ("single", "fsdp", "fsdp_ep")


@dataclass
class Runtime:
    rank: int
    world: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(smoke: bool = False) -> Runtime:
    """Start the process group torchrun describes (NCCL on GPUs, gloo on the CPU)."""
    cuda = torch.cuda.is_available() and not smoke
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    return Runtime(dist.get_rank(), dist.get_world_size(), device, mesh)


def teardown() -> None:
    dist.barrier()
    dist.destroy_process_group()


def set_fp32_exact(exact: bool) -> None:
    """float32 runs are compared to 1e-4: no TF32 anywhere."""
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy | None:
    if dtype == torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (as examples/upcycling/train.py), one group per DTensor mesh:
    torch's fused / foreach optimisers then never mix expert (grid) and other (data mesh)
    parameters in one kernel call."""
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        groups.setdefault((p.ndim >= 2, id(mesh)), []).append(p)
    return [{"params": group, "weight_decay": weight_decay if decay else 0.0}
            for (decay, _), group in groups.items()]


class Trainer:
    """One model in one mode: its optimizer and training step.

    `model` is the float32 upcycled model (CPU); it is moved to the device and, for the parallel
    modes, parallelized in place. `step(x, y)` takes this rank's share of the batch and returns
    (loss, aux) of this rank as tensors (no host sync)."""

    def __init__(self, model: nn.Module, mode: str, rt: Runtime, dtype: torch.dtype, *, lr: float,
                 weight_decay: float = 0.1, clip: float | None = 1.0, fused: bool | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: choose one of {MODES}")
        self.mode, self.rt, self.clip = mode, rt, clip
        model = model.to(rt.device).train()
        if mode == "single":
            self.weights = MasterWeights(model, dtype)
            self.model = self.weights.work.train()
            params = self.weights.parameters()
        else:
            self.weights = None
            self.model = ud.parallelize(model, rt.mesh, expert_parallel=mode == "fsdp_ep",
                                        mp_policy=mixed_precision(dtype))
            params = list(self.model.parameters())
        self.params = params
        owner = self.weights.master if self.weights is not None else self.model
        self.named_params = [(n, p) for n, p in owner.named_parameters()]
        self.last_grad_norms: dict[str, float] | None = None
        fused = rt.device.type == "cuda" if fused is None else fused
        self.optimizer = torch.optim.AdamW(param_groups(params, weight_decay), lr=lr, betas=(0.9, 0.95),
                                           fused=fused)

    def step(self, x: torch.Tensor, y: torch.Tensor, *, grad_norms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; with `grad_norms`, first record the global gradient norms of the
        expert parameters and of all others (before clipping) in `last_grad_norms`: they show a
        gradient scale error that AdamW's scale invariance would hide from the losses."""
        logits = self.model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        aux = upcycle_fx.aux_loss(self.model)
        (loss + aux).backward()
        if self.weights is not None:
            self.weights.sync_grads()
        if grad_norms:
            experts = [p for n, p in self.named_params if ".experts." in n]
            others = [p for n, p in self.named_params if ".experts." not in n]
            self.last_grad_norms = {"experts": float(ud.grad_norm(experts)), "other": float(ud.grad_norm(others))}
        if self.clip is not None:
            if self.mode == "single":
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            else:
                ud.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.weights is not None:
            self.weights.publish()
        return loss.detach(), aux.detach()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Loss of this rank's share, averaged over the ranks that hold shares."""
        self.model.eval()
        logits = self.model(input_ids=x, use_cache=False).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        self.model.train()
        return mean_over_ranks(loss, self.mode)

    def expert_loads(self) -> list[list[int]]:
        """Global per-expert loads of the last forward, per MoE layer."""
        return [m.last_expert_load.tolist() for _, m in upcycle_fx.moe_layers(self.model)]


def mean_over_ranks(value: torch.Tensor, mode: str) -> float:
    """A per-rank scalar averaged over the ranks (parallel modes) or as is (single)."""
    value = value.detach().float().reshape(())
    if mode != "single" and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def shard(batch: torch.Tensor, rt: Runtime, mode: str) -> torch.Tensor:
    """This rank's rows of a global batch (all rows in `single`)."""
    if mode == "single":
        return batch
    if batch.shape[0] % rt.world:
        raise ValueError(f"global batch of {batch.shape[0]} rows does not split over {rt.world} ranks")
    return batch.chunk(rt.world)[rt.rank]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device) -> float:
    synchronize(device)
    return time.perf_counter()


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


def fresh(model: nn.Module) -> nn.Module:
    """An independent copy of the (unparallelized, CPU) model for another mode."""
    return copy.deepcopy(model)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
