"""Balancers: what keeps the experts' loads even, and the per-optimizer-step state they need.

A balancer is registered under a name (`UpcycleConfig(balancing=...)`) with two properties: whether
routing selects on scores plus a per-expert bias (the layer then holds an `expert_bias` buffer,
saved with the model), and what to do at the end of each optimizer step with the loads routed
since the last one. Built in:

* `loss`: the Switch load-balancing loss (weight `aux_loss_weight`) is the only balancer.
* `bias`: auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437; Wang et al., arXiv
  2408.15664): top-k is chosen on scores + bias, the combine weights come from the unbiased
  scores, and after each optimizer step `b_e += bias_update_speed · sign(mean_load − load_e)`
  over the step's loads (all micro-batches, all data-parallel ranks). The Switch loss is still added when
  `aux_loss_weight > 0` (DeepSeek-V3 keeps a small complementary one); pass 0 for none.

When is "the end of an optimizer step": `after_optimizer_step(model)` marks it. It runs by
itself after `step()` of any `torch.optim.Optimizer` that holds one of the layer's parameters
(a global optimizer step hook, installed with the first such layer), which covers plain loops,
the `Trainer`, accelerate and FSDP; call it yourself after an optimizer that is not a
`torch.optim.Optimizer`. Running it twice for one step does nothing more (the step's loads are
consumed by the first call). The same mark starts a new global batch for
`balance_scope="global_batch"`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..errors import UpcycleConfigError


@dataclass(frozen=True)
class Balancer:
    """A registered balancing method (see module doc)."""

    name: str
    uses_bias: bool
    step: Callable[[nn.Module, torch.Tensor], None] | None = None  # (MoE, step loads [E]) -> None


BALANCERS: dict[str, Balancer] = {}


def register_balancer(name: str, *, uses_bias: bool = False,
                      step: Callable[[nn.Module, torch.Tensor], None] | None = None,
                      replace: bool = False) -> Balancer:
    """Make `balancing=name` available. `step(moe, loads)` runs after each optimizer step with
    the kept assignments per expert routed during it (float64 [E], summed over ranks)."""
    if not isinstance(name, str) or not name:
        raise UpcycleConfigError(f"balancer name {name!r} must be a non-empty string.")
    if name in BALANCERS and not replace:
        raise UpcycleConfigError(f"balancer {name!r} is already registered; pass replace=True to "
                                 "replace it.")
    balancer = Balancer(name, uses_bias, step)
    BALANCERS[name] = balancer
    return balancer


def get_balancer(name: str) -> Balancer:
    try:
        return BALANCERS[name]
    except (KeyError, TypeError):
        raise UpcycleConfigError(f"balancing={name!r} is unknown; registered balancers: "
                                 f"{sorted(BALANCERS)}.") from None


@torch.no_grad()
def update_bias(moe: nn.Module, loads: torch.Tensor) -> None:
    """DeepSeek-V3's update: raise the bias of under-loaded experts, lower over-loaded ones."""
    bias = moe.expert_bias
    if bias.dtype != torch.float32:  # a cast model (from_pretrained with a dtype): updates of
        bias = moe.expert_bias = bias.float()  # 1e-3 vanish in bf16, so keep it in float32
    speed = float(moe.settings.bias_update_speed)
    bias.add_(torch.sign(loads.mean() - loads).to(bias), alpha=speed)


register_balancer("loss")
register_balancer("bias", uses_bias=True, step=update_bias)


# --------------------------------------------------------------------------- per-step totals


class StepTotals:
    """What a layer routed since the last optimizer step (detached, float64, summed over the
    data-parallel ranks): `balance` = [E assignment counts, E probability sums, assignments,
    tokens] (the global-batch load-balancing loss), `loads` = [E] kept assignments (the bias)."""

    def __init__(self) -> None:
        self.balance: torch.Tensor | None = None
        self.loads: torch.Tensor | None = None
        self.last_step_balance_loss: torch.Tensor | None = None  # of the last finished step

    def add_balance(self, totals: torch.Tensor) -> torch.Tensor:
        """Add this forward's totals; returns the step's totals so far."""
        totals = totals.detach().double()
        self.balance = totals if self.balance is None else self.balance + totals
        return self.balance

    def add_loads(self, loads: torch.Tensor) -> None:
        loads = loads.detach().double()
        self.loads = loads if self.loads is None else self.loads + loads

    def global_balance_loss(self) -> torch.Tensor | None:
        """E · Σ_e f_e · P_e over the whole step's batch (a statistic, no gradient)."""
        if self.balance is None:
            return None
        num_experts = (self.balance.numel() - 2) // 2
        counts, prob_sums, (assignments, tokens) = self.balance.split([num_experts, num_experts, 2])
        return num_experts * torch.sum(counts / assignments * prob_sums / tokens)


def needs_steps(settings) -> bool:
    """Whether a layer with these settings keeps per-step state (global-batch counts or a
    balancer's step update) in training."""
    return settings.balance_scope == "global_batch" or get_balancer(settings.balancing).step is not None


def end_step(moe: nn.Module) -> None:
    """The optimizer step of `moe`'s parameters is done: apply the balancer's update to the
    loads routed since the last one, then start a new step."""
    totals = moe.step_totals
    if totals.balance is not None:
        totals.last_step_balance_loss = totals.global_balance_loss()
    loads, totals.loads, totals.balance = totals.loads, None, None
    balancer = get_balancer(moe.settings.balancing)
    if balancer.step is not None and loads is not None:
        balancer.step(moe, loads)


def after_optimizer_step(model: nn.Module) -> None:
    """Mark the end of an optimizer step for every MoE layer of `model` (see module doc): bias
    updates are applied and the global batch of `balance_scope="global_batch"` restarts."""
    from .layer import MoE

    for module in model.modules():
        if isinstance(module, MoE):
            end_step(module)


# --------------------------------------------------------------------------- the optimizer hook

_STEPPED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # layers with per-step state
_HOOK = None


def watch(moe: nn.Module) -> None:
    """Have `moe` told of every optimizer step that updates one of its parameters."""
    global _HOOK
    _STEPPED.add(moe)
    if _HOOK is None:
        _HOOK = register_optimizer_step_post_hook(_after_step)


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    if not _STEPPED:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for moe in list(_STEPPED):
        pending = moe.step_totals
        if (pending.loads is not None or pending.balance is not None) and any(
                id(p) in stepped for p in moe.parameters()):
            end_step(moe)
