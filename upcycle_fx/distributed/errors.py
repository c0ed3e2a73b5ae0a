"""Named errors of `upcycle_fx.distributed`: each says what is wrong and what to do instead."""

from __future__ import annotations

from ..errors import UpcycleError


class ParallelizeError(UpcycleError, ValueError):
    """`parallelize` cannot shard this model over this mesh as asked (wrong mesh, model already
    parallelized, a setting the distributed path does not support)."""


class ExpertParallelError(ParallelizeError):
    """Expert parallelism cannot split these experts over these ranks (the number of experts is
    not divisible by the expert-parallel degree, the degree does not divide the mesh, or a
    dispatch that needs every expert in one process was asked for)."""
