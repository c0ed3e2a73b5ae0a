"""Training upcycled models on many GPUs with PyTorch's own engine: FSDP2 + expert parallelism.

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mesh = init_device_mesh("cuda", (world_size,))
    model = upcycle_fx.distributed.parallelize(
        model, mesh, expert_parallel=True,
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    ...
    upcycle_fx.distributed.save_sharded(model, "ckpt/", optimizer=optimizer)   # every rank
    single = upcycle_fx.distributed.consolidate("ckpt/")                        # one process

Modules: `mesh` (data mesh and the (dp_mod_ep, ep) grid), `expert_parallel` (Shard(0) experts,
all-to-all dispatch), `fsdp` (fully_shard units, expert gradient scale), `stats` (global aux
losses and loads), `checkpoint` (DCP), `grads` (norms and clipping across meshes), `parallelize` (the
one call). See docs/distributed.md.
"""

from .checkpoint import consolidate, load_sharded, save_sharded
from .errors import ExpertParallelError, ParallelizeError
from .expert_parallel import AllToAllExperts, ShardedExperts
from .fsdp import find_blocks
from .grads import clip_grad_norm_, grad_norm
from .mesh import ParallelMeshes
from .parallelize import MoEParallel, parallel_meshes, parallelize
from .stats import GlobalRouterStats

__all__ = ["parallelize", "save_sharded", "load_sharded", "consolidate", "clip_grad_norm_", "grad_norm",
           "ParallelizeError", "ExpertParallelError", "ShardedExperts", "AllToAllExperts",
           "GlobalRouterStats", "MoEParallel", "ParallelMeshes", "parallel_meshes", "find_blocks"]
