"""Router statistics over the whole global batch: aux losses and per-expert loads across ranks.

Under data parallelism each rank routes its own tokens, but the Switch load-balancing loss
E · Σ_e f_e · P_e is not an average of per-rank losses: f_e (the fraction of assignments sent
to expert e) and P_e (its mean router probability) are fractions of the *global* batch. So each
rank sums its counts and probabilities, one all-reduce adds them up, and every rank computes
the loss of the global batch: 2 ranks with half batches get the value one rank gets with the
whole batch. With `balance_scope="global_batch"` the counts f_e also accumulate over the
micro-batches of one optimizer step (gradient accumulation), as in one process.

Gradients: the value is global, but autograd only sees this rank's tokens. FSDP then averages
the gradients over the W data-parallel ranks (and expert gradients are divided by W, see
`fsdp.py`). A global sum S = Σ_r S_r is therefore fed to autograd as
S + W · (S_r − stop_gradient(S_r)): the value is S and its gradient with respect to the local
part is W, so after the average over ranks each rank's tokens contribute exactly
∂loss/∂S · ∂S_r/∂θ, the single-process gradient on the global batch. No autograd collective is
needed. The same holds for the z-loss (a mean over all tokens of logsumexp²).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe import losses
from ..moe.balancing import StepTotals
from ..moe.layer import RouterStats
from ..moe.routing import Routing, expert_counts


def on_device(value: int, like: torch.Tensor) -> torch.Tensor:
    """A float64 [1] tensor holding the Python number `value` on `like`'s device, written by a fill
    kernel: `tensor.new_tensor(value)` would copy from pageable host memory, which makes the host
    wait for the GPU (one stall per MoE layer per step)."""
    return torch.full((1,), value, dtype=torch.float64, device=like.device)


class GlobalRouterStats(RouterStats):
    """`RouterStats` summed over the ranks of `group` (all data-parallel ranks): losses with the
    gradient of the global batch, loads and drop counts as totals. Each method is one small
    all-reduce (2E + 2 numbers at most); none reads anything back to the host or copies from it."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks (no gradient)."""
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def differentiable_total(self, local: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        """`total` (the sum over ranks of `local`) with gradient W · d/d(local); see module doc."""
        scaled = self.world_size * local
        return total.to(local.dtype) + (scaled - scaled.detach())

    def load_balancing_loss(self, routing: Routing, step: StepTotals | None = None) -> torch.Tensor:
        """E · Σ_e f_e · P_e with f and P over all ranks' tokens (`losses.load_balancing_loss`
        on all of them at once). With `step` (global-batch scope), f_e counts the assignments
        of all ranks' micro-batches of the optimizer step so far, this one added to `step`."""
        num_experts = routing.num_experts
        counts = expert_counts(routing.expert_idx, num_experts)
        prob_sum = routing.probs.sum(dim=0)
        sizes = [on_device(routing.expert_idx.numel(), prob_sum), on_device(routing.probs.shape[0], prob_sum)]
        # One all-reduce: counts and sizes are exact in float64 up to 2^53.
        packed = self.total(torch.cat([counts.double(), prob_sum.double(), *sizes]))
        global_counts, global_prob_sum, (assignments, tokens) = packed.split([num_experts, num_experts, 2])
        fraction = (global_counts / assignments).to(prob_sum.dtype)
        if step is not None:  # packed has the layout of losses.balance_totals
            step_totals = step.add_balance(packed)
            fraction = (step_totals[:num_experts] / step_totals[2 * num_experts]).to(prob_sum.dtype)
        mean_probs = self.differentiable_total(prob_sum, global_prob_sum) / tokens.to(prob_sum.dtype)
        return num_experts * torch.sum(fraction * mean_probs)

    def router_z_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean of logsumexp(logits)² over the global batch (`losses.router_z_loss` of all tokens)."""
        tokens = logits.shape[0]
        local_sum = losses.router_z_loss(logits) * tokens
        packed = self.total(torch.cat([local_sum.detach().double().reshape(1), on_device(tokens, local_sum)]))
        return self.differentiable_total(local_sum, packed[0]) / packed[1].to(local_sum.dtype)

    def expert_load(self, routing: Routing) -> torch.Tensor:
        """Kept assignments per expert over all ranks, [E] int64."""
        return self.total(super().expert_load(routing))

    def dropped(self, routing: Routing) -> torch.Tensor:
        """Assignments dropped by the capacity limit over all ranks."""
        return self.total(super().dropped(routing))
