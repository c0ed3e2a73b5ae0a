"""`MoE`: the module every converted FFN becomes (router + experts + routing + dispatch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import balancing, losses
from .balancing import StepTotals, get_balancer, needs_steps
from .dispatch import dispatch
from .experts import Experts
from .router import Router
from .shared import SharedExperts
from .routing import EXPERT_CHOICE_CAPACITY, Routing, expert_choice_routing, top_k_routing
from .scoring import get_scorer


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
    scoring: str = "softmax"
    balancing: str = "loss"
    bias_update_speed: float = 0.001
    balance_scope: str = "micro_batch"
    routed_scaling_factor: float = 1.0
    weight_scaling: bool = False

    def combine_scale(self, num_experts: int) -> float:
        """Factor on the combine weights: `routed_scaling_factor`, times, with `weight_scaling`,
        the inverse of the k weights' sum when routing is uniform (E/k for softmax, 2/k for
        sigmoid: 2410.07524's scaling, which makes an unnormalised layer of identical experts
        compute the dense FFN while routing is uniform)."""
        scale = float(self.routed_scaling_factor)
        if self.weight_scaling:
            scale /= self.top_k * get_scorer(self.scoring).uniform(num_experts)
        return scale

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

    def load_balancing_loss(self, routing: Routing, step: StepTotals | None = None) -> torch.Tensor:
        """The Switch loss of this batch; with `step` (global-batch scope), f_e over the step's
        batches so far, this one added to `step`."""
        if step is None:
            return losses.load_balancing_loss(routing)
        return losses.load_balancing_loss(routing, step.add_balance(losses.balance_totals(routing)))

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

    Balancing state: with `balancing="bias"` the layer holds an `expert_bias` buffer ([E]
    float32, saved with the model) that top-k selection adds to the scores; `step_totals` holds
    what training forwards routed since the last optimizer step (the bias update's loads, the
    global batch's counts), consumed by `upcycle_fx.after_optimizer_step` (see `balancing.py`).

    `parallel` is the hook of the distributed path: None (the default) computes everything in
    this process. `upcycle_fx.distributed.parallelize` installs an object with `.experts(moe)`
    (what the dispatch core runs the assignments through: this layer's `experts`, or an adapter
    that sends rows to the ranks holding their experts by all-to-all) and `.stats` (a
    `RouterStats` summing over the data-parallel ranks).

    `shared` (or None): always-active experts added to every token's output (`SharedExperts`).
    """

    parallel = None
    FLOAT32_TENSORS = ("expert_bias",)  # kept in float32 whatever the model's dtype (see _apply)

    def __init__(self, router: Router, experts: Experts, settings: MoESettings, *,
                 dispatch_impl: str = "auto", source: str = "", mlp_index: int = 0,
                 shared: SharedExperts | None = None) -> None:
        super().__init__()
        self.router = router
        self.experts = experts
        self.shared = shared
        self.settings = settings  # registers the expert_bias buffer where the balancer needs it
        self.step_totals = StepTotals()
        self.dispatch_impl = dispatch_impl
        self.source = source        # where the dense FFN came from, for reports
        self.mlp_index = mlp_index  # its index among the model's FFNs (execution order)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_load: torch.Tensor | None = None
        self.last_dropped: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    @property
    def settings(self) -> MoESettings:
        return self._settings

    @settings.setter
    def settings(self, settings: MoESettings) -> None:
        """Also keeps the `expert_bias` buffer in line: present ([E] float32 zeros if new or
        of another size) exactly when the balancer selects on biased scores."""
        self._settings = settings
        if needs_steps(settings):  # here, not in forward: torch.compile cannot trace the registry
            balancing.watch(self)
        bias = self._buffers.get("expert_bias")
        if not get_balancer(settings.balancing).uses_bias:
            self._buffers.pop("expert_bias", None)
        elif bias is None or bias.shape != (self.num_experts,):
            device = self.router.weight.device
            self.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32,
                                                            device=device))

    def _apply(self, fn, recurse=True):
        """`model.to(dtype)` leaves `expert_bias` in float32 (moved, not rounded): its updates
        (1e-3) would vanish in bf16."""
        bias = self._buffers.pop("expert_bias", None)
        result = super()._apply(fn, recurse)
        if bias is not None:
            moved = fn(bias)
            self._buffers["expert_bias"] = (moved if moved.dtype == torch.float32
                                            else bias.to(moved.device))
        return result

    def route(self, logits: torch.Tensor) -> Routing:
        s = self.settings
        if s.routing == "expert_choice":
            return expert_choice_routing(logits, s.capacity, scoring=s.scoring)
        return top_k_routing(logits, s.top_k, normalize=s.normalize_weights,
                             capacity_factor=s.capacity_factor, scoring=s.scoring,
                             bias=self._buffers.get("expert_bias"),
                             scale=s.combine_scale(self.num_experts))

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
        return {**state, "last_aux_loss": None, "last_expert_load": None, "last_dropped": None,
                "step_totals": StepTotals()}

    def __setstate__(self, state: dict) -> None:
        """Pickles of layers from before the balancing state existed load too."""
        if "settings" in state:
            state["_settings"] = state.pop("settings")
        state.setdefault("step_totals", StepTotals())
        super().__setstate__(state)
        if needs_steps(self._settings):  # copies are told of optimizer steps too
            balancing.watch(self)

    def reset_stats(self) -> None:
        """Forget the last forward's losses and loads."""
        self.last_aux_loss = self.last_expert_load = self.last_dropped = None

    def _record(self, logits: torch.Tensor, routing: Routing) -> None:
        s = self.settings
        stats = LOCAL_STATS if self.parallel is None else self.parallel.stats
        per_step = self.training and needs_steps(s)
        aux = logits.new_zeros(())
        if s.aux_loss_weight and s.routing == "top_k":
            step = self.step_totals if per_step and s.balance_scope == "global_batch" else None
            aux = aux + s.aux_loss_weight * stats.load_balancing_loss(routing, step)
        if s.z_loss_weight:
            aux = aux + s.z_loss_weight * stats.router_z_loss(logits)
        self.last_aux_loss = aux
        self.last_expert_load = stats.expert_load(routing).detach()
        self.last_dropped = stats.dropped(routing).detach()
        if per_step and get_balancer(s.balancing).step is not None:
            self.step_totals.add_loads(self.last_expert_load)

    def extra_repr(self) -> str:
        s = self.settings
        layout = f", granularity={s.granularity}" if s.granularity != 1 else ""
        return (f"routing={s.routing}, top_k={s.top_k}, capacity_factor={s.capacity_factor}, "
                f"normalize_weights={s.normalize_weights}{layout}, scoring={s.scoring}, "
                f"balancing={s.balancing}, source={self.source!r}")
