"""FSDP2 (`fully_shard`) units of an upcycled model, and the gradient scale of its experts.

Units, innermost first (FSDP2 leaves the parameters of an inner unit to that unit):
1. with expert parallelism, each MoE layer's experts: `ShardedExperts` over the `dp_mod_ep`
   mesh dimension (the ranks holding the same experts); their dispatch methods are registered as
   FSDP forward methods, since the dispatch core calls them instead of `forward`;
2. each MoE layer's router, when the mixed-precision policy computes in another dtype than
   float32: the router keeps computing in float32 from float32 weights (ST-MoE; see `Router`);
3. each transformer block (the children of a stack of repeated blocks, or `blocks=`);
4. the root (embeddings, final norm, output head, whatever is left).

Gradient scale. FSDP averages each gradient over the ranks it reduces over. Non-expert
parameters are reduced over all W ranks, and each rank's loss is the mean over its own tokens,
so the average is the gradient of the global batch. An expert's gradient instead arrives as a
sum over the `ep` ranks whose tokens it served (through the all-to-all's backward); FSDP then
sums it over the W/ep expert replicas. Dividing by W (`set_gradient_divide_factor`) makes it
the global-batch gradient too. On gloo, which has no pre-scaled sum, the reduction over several
replicas is a sum followed by the division (`set_force_sum_reduction_for_comms`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import Shard
from torch.torch_version import TorchVersion

from ..moe import MoE
from ..report import moe_layers
from .errors import ParallelizeError
from .expert_parallel import ShardedExperts
from .mesh import ParallelMeshes, uses_gloo

EXPERT_FORWARD_METHODS = ("forward_grouped", "forward_batched")


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of every outermost ModuleList / Sequential that holds at
    least two modules of one class (`model.layers.*` of a Llama, T5's encoder and decoder
    `block.*`), in module order."""
    blocks: list[nn.Module] = []
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path == p or path.startswith(p + ".") for p in inside):
            continue
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and module is not model:
            classes = [type(child) for child in module]
            if any(classes.count(c) >= 2 for c in set(classes)):
                blocks.extend(module)
                inside.append(path)
    return blocks


def _expert_placement(local_experts: int, replicas: int) -> Callable[[nn.Parameter], Shard]:
    """FSDP's shard dim for expert parameters: the expert dim when the local experts split evenly
    over the replicas, else the first other dim that does (FSDP2 pads only dim 0)."""
    def placement(param: nn.Parameter) -> Shard:
        if local_experts % replicas == 0:
            return Shard(0)
        for dim in range(1, param.ndim):
            if param.shape[dim] % replicas == 0:
                return Shard(dim)
        return Shard(0)
    return placement


def shard_experts_fsdp(moe: MoE, meshes: ParallelMeshes, mp_policy: MixedPrecisionPolicy,
                       reshard_after_forward: bool) -> None:
    """Unit 1: the expert-parallel experts of `moe` over the expert replicas, gradients / W."""
    experts = moe.experts
    assert isinstance(experts, ShardedExperts)
    replicas = meshes.expert_replicas
    if replicas.size() == 1 and TorchVersion(torch.__version__) < "2.10":
        raise ParallelizeError(
            f"torch {torch.__version__} ignores FSDP's gradient divide factor on a single replica "
            "(fixed in 2.10, pytorch#167178), so expert gradients would be ep_degree times too large; "
            "upgrade torch, or use an ep_degree smaller than the number of ranks.")
    fully_shard(experts, mesh=replicas, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                shard_placement_fn=_expert_placement(experts.num_experts // meshes.ep_degree, replicas.size()))
    for method in EXPERT_FORWARD_METHODS:
        register_fsdp_forward_method(experts, method)
    # torch >= 2.10 honours the factor also for a single replica (pytorch#167178); older torch
    # names the setter set_reduce_scatter_divide_factor.
    divide = getattr(experts, "set_gradient_divide_factor", None) or experts.set_reduce_scatter_divide_factor
    divide(float(meshes.world_size))
    if replicas.size() > 1 and uses_gloo(replicas):
        # gloo has no PREMUL_SUM. Not for a single replica: there FSDP divides while copying the
        # gradient and, with forced sums, once more afterwards (torch 2.13).
        experts.set_force_sum_reduction_for_comms(True)


def router_policy(mp_policy: MixedPrecisionPolicy) -> MixedPrecisionPolicy | None:
    """The policy of a separate router unit (float32), or None when the router needs none."""
    if mp_policy.param_dtype in (None, torch.float32):
        return None
    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def apply_fsdp(model: nn.Module, meshes: ParallelMeshes, *, mp_policy: MixedPrecisionPolicy,
               reshard_after_forward: bool, blocks: Iterable[nn.Module] | None) -> None:
    """`fully_shard` every unit of the module doc, innermost first."""
    layers = [moe for _, moe in moe_layers(model)]
    if meshes.grid is not None:
        for moe in layers:
            shard_experts_fsdp(moe, meshes, mp_policy, reshard_after_forward)
    policy = router_policy(mp_policy)
    if policy is not None:
        for moe in layers:
            fully_shard(moe.router, mesh=meshes.data, mp_policy=policy,
                        reshard_after_forward=reshard_after_forward)
    for block in (find_blocks(model) if blocks is None else list(blocks)):
        fully_shard(block, mesh=meshes.data, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=meshes.data, mp_policy=mp_policy)
