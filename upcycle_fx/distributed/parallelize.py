"""`parallelize`: one call that makes an upcycled model train on many ranks (FSDP2, optionally
with expert parallelism), and the hook object it installs in each MoE layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy

from ..moe import MoE
from ..report import moe_layers
from .errors import ExpertParallelError, ParallelizeError
from .expert_parallel import AllToAllExperts, check_divisible, shard_experts
from .fsdp import apply_fsdp
from .mesh import ParallelMeshes, build_meshes, check_data_mesh, resolve_ep_degree
from .stats import GlobalRouterStats


@dataclass
class MoEParallel:
    """What `MoE.parallel` holds after `parallelize`: the statistics over all data-parallel ranks
    and, with expert parallelism, the all-to-all adapter the dispatch core runs through."""

    stats: GlobalRouterStats
    all_to_all: AllToAllExperts | None = None

    def experts(self, moe: MoE):
        return moe.experts if self.all_to_all is None else self.all_to_all


def parallelize(model: nn.Module, mesh: DeviceMesh, *, expert_parallel: bool = False,
                ep_degree: int | None = None, mp_policy: MixedPrecisionPolicy | None = None,
                reshard_after_forward: bool = True, blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Shard an upcycled `model` over the ranks of the 1-D `mesh` for training; returns `model`
    (changed in place, as `fully_shard` does). Collective: call it on every rank, with the same
    model (same weights) everywhere.

    * FSDP2 shards every parameter (routers, experts, attention, embeddings) over the mesh, one
      unit per transformer block (`blocks`, found automatically) plus the root, with
      `mp_policy` (e.g. bf16 parameters, float32 gradient reduction). Routers stay float32.
    * `expert_parallel=True` additionally splits each MoE layer's experts over `ep_degree` ranks
      (default: the whole mesh) as DTensor `Shard(0)` and moves tokens to them by all-to-all.
      The number of experts of every layer must be divisible by `ep_degree`.
    * The aux losses, `last_expert_load` and `last_dropped` become those of the global batch.

    With equal per-rank batches, a step gives the gradient single-process training computes on
    the concatenated batch. Capacity routings (expert choice, top-k with capacity_factor) choose
    within each rank's batch (the routing group, as in GShard); dropless top-k is per token and
    so independent of how the batch is split.
    """
    check_data_mesh(mesh)
    layers = moe_layers(model)
    if isinstance(model, FSDPModule) or any(moe.parallel is not None for _, moe in layers):
        raise ParallelizeError(f"{type(model).__name__} is already parallelized; call parallelize once "
                               "on the single-process model.")
    if not layers:
        raise ParallelizeError(f"{type(model).__name__} has no upcycle_fx.MoE layer; upcycle it first "
                               "(upcycle_fx.rewrite), or use torch's fully_shard directly for a dense model.")
    if ep_degree is not None and not expert_parallel:
        raise ParallelizeError(f"ep_degree={ep_degree} was given without expert_parallel=True; pass both "
                               "to split the experts, or neither for FSDP alone.")
    ep = resolve_ep_degree(mesh.size(), ep_degree) if expert_parallel else 1
    if ep > 1:
        check_divisible(model, ep)
        loops = [path for path, moe in layers if moe.dispatch_impl == "loop"]
        if loops:
            raise ExpertParallelError(f"{loops[0]} uses dispatch_impl='loop' (the single-process oracle, which "
                                      "needs every expert in one process); set it to 'auto' before parallelize.")
    meshes = build_meshes(mesh, ep)
    stats = GlobalRouterStats(mesh.get_group())
    for _, moe in layers:
        adapter = None
        if meshes.grid is not None:
            adapter = AllToAllExperts(shard_experts(moe.experts, meshes.expert), meshes.expert)
        moe.parallel = MoEParallel(stats, adapter)
    apply_fsdp(model, meshes, mp_policy=mp_policy or MixedPrecisionPolicy(),
               reshard_after_forward=reshard_after_forward, blocks=blocks)
    model._upcycle_fx_meshes = meshes  # see parallel_meshes
    return model


def parallel_meshes(model: nn.Module) -> ParallelMeshes:
    """The meshes `parallelize` used for `model`."""
    meshes = getattr(model, "_upcycle_fx_meshes", None)
    if meshes is None:
        raise ParallelizeError(f"{type(model).__name__} was not parallelized with upcycle_fx.distributed.parallelize")
    return meshes

