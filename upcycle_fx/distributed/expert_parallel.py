"""Expert parallelism: each rank holds E/ep experts of every MoE layer and tokens travel to them.

Weights: the stacked expert parameters ([E, ...]) become DTensors sharded on the expert
dimension (`Shard(0)`) over the `ep` mesh, so rank j of an expert-parallel group holds experts
j·E/ep … (j+1)·E/ep − 1 (`shard_experts`, which also turns the module into `ShardedExperts`).

Tokens: routing happens on each rank for its own tokens, then the dispatch core
(`moe/dispatch.py`) runs as in one process, with `AllToAllExperts` in place of the experts. Its
`forward_grouped` / `forward_batched` receive the rows already sorted by expert; they
1. exchange per-expert row counts with the other ranks (one small all-to-all), and read the
   split sizes back to the host (the one host sync of the layer; NCCL's all_to_all_single needs
   them);
2. send each rank the rows of its experts (all-to-all with autograd,
   `_functional_collectives.all_to_all_single_autograd`: its backward sends the gradients back
   the same way);
3. reorder the rows received from all ranks by local expert and run `Experts`' own
   `forward_grouped` (dropless top-k) or `forward_batched` (capacity routings, each local expert
   then has the slots of every rank) on the local experts;
4. send the outputs back by the reverse all-to-all, in the order the dispatch core sent them.
The dispatch core then combines them with the routing weights as usual. Every rank's local
experts thus see every rank's tokens: their gradient is a sum over the expert-parallel group,
which `fsdp.py` divides by the number of data-parallel ranks like every other gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..moe.experts import Experts
from ..report import moe_layers
from .errors import ExpertParallelError

STACKED = ("up_proj", "up_bias", "down_proj", "down_bias")


def check_divisible(model: nn.Module, ep_degree: int) -> None:
    """Raise ExpertParallelError naming every MoE layer whose experts do not split evenly."""
    bad = [f"{path} ({moe.num_experts} experts)" for path, moe in moe_layers(model)
           if moe.num_experts % ep_degree]
    if bad:
        raise ExpertParallelError(
            f"expert parallelism over {ep_degree} ranks needs a number of experts divisible by {ep_degree}; "
            f"not so for {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}. Choose ep_degree= among the "
            "common divisors of the expert counts and the world size, or use FSDP alone (expert_parallel=False).")


class LocalExperts:
    """This rank's slice of an `Experts`: the same attributes, with plain local tensors and
    `num_experts` = E/ep, so that `Experts`' own forward methods run on it unchanged."""

    hidden = Experts.hidden

    def __init__(self, experts: "ShardedExperts") -> None:
        for name in STACKED:
            param = getattr(experts, name)
            setattr(self, name, param.to_local() if isinstance(param, DTensor) else param)
        self.num_experts = self.up_proj.shape[0]
        self.d_ff, self.gated, self.up_bias_half = experts.d_ff, experts.gated, experts.up_bias_half
        self.activation, self.hidden_dropout = experts.activation, experts.hidden_dropout
        self.training = experts.training


class ShardedExperts(Experts):
    """`Experts` whose stacked parameters are DTensors `Shard(0)` over the expert-parallel mesh.

    Shapes, `num_experts` and the state dict keep describing all E experts (a DTensor reports its
    global shape), so reports and checkpoints are unchanged. `forward_grouped` and
    `forward_batched` take rows for this rank's experts only (local expert indices) and compute
    them with `Experts`' methods on the local slice; FSDP registers both as forward methods.
    """

    def local(self) -> LocalExperts:
        return LocalExperts(self)

    def forward_grouped(self, x: torch.Tensor, expert_idx: torch.Tensor, offsets: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
        return Experts.forward_grouped(self.local(), x, expert_idx, offsets, counts)

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        return Experts.forward_batched(self.local(), x)

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        raise ExpertParallelError(
            "dispatch_impl='loop' (the single-process oracle) needs every expert in one process; under "
            "expert parallelism use 'auto', 'grouped' or 'batched'.")


def shard_experts(experts: Experts, mesh: DeviceMesh) -> ShardedExperts:
    """Turn `experts` (in place) into `ShardedExperts` with `Shard(0)` DTensor parameters on `mesh`.

    The experts' shards are scattered from rank 0 (`distribute_tensor`'s default); FSDP2 takes
    every other parameter's shard from the rank's own copy, so every rank must build the same
    model (same checkpoint or seed) before `parallelize`."""
    if experts.num_experts % mesh.size():
        raise ExpertParallelError(f"{experts.num_experts} experts do not split over {mesh.size()} ranks")
    for name in STACKED:
        param = getattr(experts, name)
        if param is None:
            continue
        if isinstance(param, DTensor):
            raise ExpertParallelError(f"experts.{name} is already a DTensor: parallelize a model once")
        sharded = distribute_tensor(param.detach(), mesh, [Shard(0)])
        setattr(experts, name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    experts.__class__ = ShardedExperts
    return experts


@dataclass
class _Route:
    """Where the rows of one dispatch go: split sizes per rank both ways, and the permutation
    that sorts the received rows by local expert."""

    send_splits: list[int]
    recv_splits: list[int]
    order: torch.Tensor      # received row i of the sorted layout = received row order[i]
    inverse: torch.Tensor    # and back
    local_counts: torch.Tensor   # [E/ep] rows per local expert
    local_expert: torch.Tensor   # [rows] local expert index of each sorted row


class AllToAllExperts:
    """All E experts of one MoE layer as seen from one rank, for the dispatch core.

    It has `Experts`' dispatch interface (`num_experts` = E, rows sorted by global expert in,
    outputs in the same order out) and sends each row to the rank that holds its expert (see the
    module doc). `experts` is the layer's `ShardedExperts` (an FSDP module: calling its forward
    methods gathers its parameters over the expert replicas)."""

    def __init__(self, experts: ShardedExperts, mesh: DeviceMesh) -> None:
        self.experts = experts
        self.group = mesh.get_group()
        self.ep_degree = mesh.size()
        self.num_experts = experts.num_experts
        self.local_experts = self.num_experts // self.ep_degree

    def _route(self, counts: torch.Tensor) -> _Route:
        """counts: [E] rows this rank sends to each (global) expert."""
        ep, local = self.ep_degree, self.local_experts
        send_counts = counts.to(torch.int64).reshape(ep, local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        # recv_counts[j, e]: rows rank j sends to local expert e. The one host sync:
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        received = sum(splits[1])
        local_expert = torch.arange(local, device=counts.device).repeat(ep).repeat_interleave(
            recv_counts.reshape(-1), output_size=received)
        order = torch.argsort(local_expert, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return _Route(splits[0], splits[1], order, inverse, recv_counts.sum(0), local_expert[order])

    def _to_experts(self, rows: torch.Tensor, route: _Route) -> torch.Tensor:
        received = funcol.all_to_all_single_autograd(rows.contiguous(), route.recv_splits,
                                                     route.send_splits, self.group)
        return received[route.order]

    def _from_experts(self, rows: torch.Tensor, route: _Route) -> torch.Tensor:
        # (An AsyncCollectiveTensor: the first op that reads it waits for the collective.)
        return funcol.all_to_all_single_autograd(rows[route.inverse].contiguous(), route.send_splits,
                                                 route.recv_splits, self.group)

    def forward_grouped(self, x: torch.Tensor, expert_idx: torch.Tensor, offsets: torch.Tensor,
                        counts: torch.Tensor) -> torch.Tensor:
        """Rows x: [N, D] sorted by expert (counts: [E] rows per expert) -> [N, D]."""
        route = self._route(counts)
        rows = self._to_experts(x, route)
        local_offsets = route.local_counts.cumsum(0).to(torch.int32)
        out = self.experts.forward_grouped(rows, route.local_expert, local_offsets, route.local_counts)
        return self._from_experts(out, route)

    def forward_batched(self, x: torch.Tensor) -> torch.Tensor:
        """Slots x: [E, C, D] -> [E, C, D]; each local expert runs the slots of every rank at once."""
        num_experts, capacity, width = x.shape
        counts = torch.full((num_experts,), capacity, dtype=torch.int64, device=x.device)
        route = self._route(counts)
        rows = self._to_experts(x.reshape(num_experts * capacity, width), route)
        out = self.experts.forward_batched(rows.view(self.local_experts, -1, width))
        return self._from_experts(out.reshape(-1, width), route).view(num_experts, capacity, width)

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        return self.experts.forward_expert(expert, x)
