"""`MoE`: the module every converted FFN becomes (router + experts + routing + dispatch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import losses
from .dispatch import dispatch
from .experts import Experts
from .router import Router
from .shared import SharedExperts
from .routing import EXPERT_CHOICE_CAPACITY, Routing, expert_choice_routing, top_k_routing


@dataclass(frozen=True)
class MoESettings:
    """Per-layer routing settings (a subset of `UpcycleConfig`, same field names).

    `granularity`, `num_shared_experts` and `shared_expert_gate` describe how the layer was made
    from its FFN (`segments.py`); they are kept here so that a saved model is rebuilt the same.
    """

    top_k: int = 2
    routing: str = "top_k"
    capacity_factor: float | None = None
    normalize_weights: bool = True
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.0
    granularity: int = 1
    num_shared_experts: int = 0
    shared_expert_gate: bool = False

    @property
    def capacity(self) -> float | None:
        """Capacity factor in force: expert choice always has one (default 2.0)."""
        if self.routing == "expert_choice" and self.capacity_factor is None:
            return EXPERT_CHOICE_CAPACITY
        return self.capacity_factor

    def experts_per_token(self, num_experts: int) -> float:
        """Experts a token uses on average: k for top-k, C for expert choice."""
        if self.routing == "expert_choice":
            return min(self.capacity, float(num_experts))
        return float(self.top_k)


class RouterStats:
    """The router statistics `MoE` keeps after each forward, computed over this process's tokens.

    `upcycle_fx.distributed` installs a subclass that sums them over the data-parallel ranks, so
    that the losses and loads are those of the global batch (see `MoE.parallel`).
    """

    def load_balancing_loss(self, routing: Routing) -> torch.Tensor:
        return losses.load_balancing_loss(routing)

    def router_z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        return losses.router_z_loss(logits)

    def expert_load(self, routing: Routing) -> torch.Tensor:
        return routing.expert_load()

    def dropped(self, routing: Routing) -> torch.Tensor:
        return (~routing.kept).sum()


LOCAL_STATS = RouterStats()


class MoE(nn.Module):
    """Mixture of Experts replacing one dense FFN: `.router` (d_model -> E, logits in float32) and `.experts`.

    Input [..., d_model] -> output [..., d_model]. After each forward the layer keeps, for
    logging and for `upcycle_fx.aux_loss`: `last_aux_loss` (weighted load-balancing + z-loss,
    with gradient), `last_expert_load` ([E] kept assignments per expert) and
    `last_dropped` (assignments dropped by the capacity limit).

    `parallel` is the hook of the distributed path: None (the default) computes everything in
    this process. `upcycle_fx.distributed.parallelize` installs an object with `.experts(moe)`
    (what the dispatch core runs the assignments through: this layer's `experts`, or an adapter
    that sends rows to the ranks holding their experts by all-to-all) and `.stats` (a
    `RouterStats` summing over the data-parallel ranks).

    `shared` (or None): always-active experts added to every token's output (`SharedExperts`).
    """

    parallel = None

    def __init__(self, router: Router, experts: Experts, settings: MoESettings, *,
                 dispatch_impl: str = "auto", source: str = "", mlp_index: int = 0,
                 shared: SharedExperts | None = None) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared = shared
        self.settings = settings
        self.dispatch_impl = dispatch_impl
        self.source = source        # where the dense FFN came from, for reports
        self.mlp_index = mlp_index  # its index among the model's FFNs (execution order)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_load: torch.Tensor | None = None
        self.last_dropped: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def route(self, logits: torch.Tensor) -> Routing:
        s = self.settings
        if s.routing == "expert_choice":
            return expert_choice_routing(logits, s.capacity)
        return top_k_routing(logits, s.top_k, normalize=s.normalize_weights,
                             capacity_factor=s.capacity_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = self.router(tokens)
        routing = self.route(logits)
        experts = self.experts if self.parallel is None else self.parallel.experts(self)
        out = dispatch(tokens, routing, experts, self.dispatch_impl)
        if self.shared is not None:
            out = out + self.shared(tokens)
        self._record(logits, routing)
        return out.reshape(x.shape)

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the last forward's statistics (the aux loss holds an
        autograd graph, which `copy.deepcopy` refuses)."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "last_aux_loss": None, "last_expert_load": None, "last_dropped": None}

    def reset_stats(self) -> None:
        """Forget the last forward's losses and loads."""
        self.last_aux_loss = self.last_expert_load = self.last_dropped = None

    def _record(self, logits: torch.Tensor, routing: Routing) -> None:
        s = self.settings
        stats = LOCAL_STATS if self.parallel is None else self.parallel.stats
        aux = logits.new_zeros(())
        if s.aux_loss_weight and s.routing == "top_k":
            aux = aux + s.aux_loss_weight * stats.load_balancing_loss(routing)
        if s.z_loss_weight:
            aux = aux + s.z_loss_weight * stats.router_z_loss(logits)
        self.last_aux_loss = aux
        self.last_expert_load = stats.expert_load(routing).detach()
        self.last_dropped = stats.dropped(routing).detach()

    def extra_repr(self) -> str:
        s = self.settings
        layout = f", granularity={s.granularity}" if s.granularity != 1 else ""
        return (f"routing={s.routing}, top_k={s.top_k}, capacity_factor={s.capacity_factor}, "
                f"normalize_weights={s.normalize_weights}{layout}, source={self.source!r}")
