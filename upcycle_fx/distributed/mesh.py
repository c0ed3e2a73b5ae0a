"""The device meshes of a parallelized model: data parallel over all ranks, and for expert
parallelism the same ranks viewed as a 2-D grid (dp_mod_ep × ep).

With W ranks and expert-parallel degree `ep`, rank r sits at row r // ep, column r % ep:
* the `ep` dimension (a row: `ep` consecutive ranks, e.g. the GPUs of one node) shares one copy
  of each MoE layer's experts, E/ep experts per rank (DTensor `Shard(0)`), and exchanges tokens
  by all-to-all;
* the `dp_mod_ep` dimension (a column: W/ep ranks holding the same experts) shards those local
  experts once more with FSDP and reduces their gradients;
* everything else (attention, norms, routers, embeddings) is FSDP-sharded over all W ranks.
This is torchtitan's layout; FSDP2 needs the expert mesh and the mesh it shards the experts
over to be dimensions of one 2-D mesh, hence the grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .errors import ExpertParallelError, ParallelizeError


@dataclass(frozen=True)
class ParallelMeshes:
    """`data`: all ranks (1-D, FSDP of the non-expert parameters, router statistics);
    `grid`: (dp_mod_ep, ep) view of the same ranks, or None without expert parallelism."""

    data: DeviceMesh
    grid: DeviceMesh | None = None

    @property
    def world_size(self) -> int:
        return self.data.size()

    @property
    def ep_degree(self) -> int:
        return 1 if self.grid is None else self.grid["ep"].size()

    @property
    def expert(self) -> DeviceMesh:
        """The ranks that split one copy of the experts between them."""
        if self.grid is None:
            raise ExpertParallelError("this model is not expert-parallel")
        return self.grid["ep"]

    @property
    def expert_replicas(self) -> DeviceMesh:
        """The ranks that hold the same experts (FSDP shards them over this dimension)."""
        if self.grid is None:
            raise ExpertParallelError("this model is not expert-parallel")
        return self.grid["dp_mod_ep"]


def check_data_mesh(mesh: DeviceMesh) -> None:
    """The mesh `parallelize` takes: 1-D, over an initialised process group."""
    if not isinstance(mesh, DeviceMesh):
        raise ParallelizeError(f"mesh must be a torch DeviceMesh, not {type(mesh).__name__}; make one "
                               "with torch.distributed.device_mesh.init_device_mesh('cuda', (world_size,)).")
    if mesh.ndim != 1:
        raise ParallelizeError(
            f"mesh has {mesh.ndim} dimensions {mesh.mesh_dim_names}; pass the 1-D mesh of all data-parallel "
            "ranks (init_device_mesh(device, (world_size,))) and choose the expert-parallel degree with "
            "ep_degree=: parallelize builds the (dp_mod_ep, ep) grid itself.")


def resolve_ep_degree(world_size: int, ep_degree: int | None) -> int:
    """The expert-parallel degree: all ranks by default; it must divide the number of ranks."""
    ep = world_size if ep_degree is None else int(ep_degree)
    if ep < 1 or world_size % ep:
        raise ExpertParallelError(
            f"ep_degree={ep_degree} does not divide the {world_size} ranks of the mesh; choose a divisor "
            f"of {world_size} (ranks r, r+1, ..., r+ep-1 then share one copy of the experts).")
    return ep


def build_meshes(mesh: DeviceMesh, ep_degree: int) -> ParallelMeshes:
    """The meshes for `ep_degree` (1: no expert parallelism). Collective: every rank calls it."""
    if ep_degree == 1:
        return ParallelMeshes(mesh)
    ranks = mesh.mesh.reshape(-1)
    grid = DeviceMesh(mesh.device_type, ranks.view(mesh.size() // ep_degree, ep_degree),
                      mesh_dim_names=("dp_mod_ep", "ep"))
    return ParallelMeshes(mesh, grid)


def uses_gloo(mesh: DeviceMesh) -> bool:
    """Whether the mesh's collectives run on gloo (CPU), which lacks NCCL's pre-scaled sums."""
    backend = dist.get_backend(mesh.get_group())
    return "gloo" in str(backend).lower() and "nccl" not in str(backend).lower()

