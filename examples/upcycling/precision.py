"""bf16 weights for speed, float32 master weights for the optimizer.

Why not autocast: `upcycle_fx`'s fast expert dispatch on CUDA is `grouped_mm` in bf16, which
needs bf16 activations *and* bf16 expert weights. Under autocast with float32 weights, the
residual stream (and so the MoE input) stays float32 and the experts would take the float32
fallback, far slower than the dense MLP they are compared against. So the model that runs
forward/backward holds bf16 weights (as in benchmarks/train_step.py), except the routers,
which stay float32 (ST-MoE: routing is sensitive to rounding). Pure bf16 AdamW would lose
small updates to rounding as the learning rate decays, so the optimizer steps float32 master
copies and writes them back to the bf16 model after each step. Floating-point buffers (the
rotary position frequencies) also stay float32: rounded to bf16, position x frequency would be
off by up to ~0.05 rad at position 511. On the CPU (smoke runs, float32) the working model is
the master model and nothing is copied.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import upcycle_fx


class MasterWeights:
    """`work`: the module to run (dtype `dtype`); `master`: its float32 twin the optimizer steps.

    Call `sync_grads()` after backward and `publish()` after the optimizer step.
    """

    def __init__(self, master: nn.Module, dtype: torch.dtype) -> None:
        self.master = master
        if dtype == torch.float32:
            self.work = master
        else:
            self.work = copy.deepcopy(master).to(dtype)
            for _, moe in upcycle_fx.moe_layers(self.work):
                moe.router.float()
            for work_module, master_module in zip(self.work.modules(), master.modules()):
                for name, buffer in master_module.named_buffers(recurse=False):
                    if buffer is not None and buffer.is_floating_point():
                        work_module._buffers[name] = buffer.detach().clone()
        self.pairs = [] if self.work is master else list(zip(self.work.parameters(), master.parameters()))
        for work_p, master_p in self.pairs:
            if work_p.shape != master_p.shape:
                raise RuntimeError("working and master models do not line up")

    def parameters(self) -> list[nn.Parameter]:
        """The parameters the optimizer owns (the float32 ones)."""
        return list(self.master.parameters())

    def sync_grads(self) -> None:
        """Copy the working model's gradients into the master parameters (float32)."""
        if not self.pairs:
            return
        work, master = [], []
        for work_p, master_p in self.pairs:
            if work_p.grad is None:
                master_p.grad = None
                continue
            if master_p.grad is None:
                master_p.grad = torch.empty_like(master_p)
            work.append(work_p.grad)
            master.append(master_p.grad)
        torch._foreach_copy_(master, work)
        self.work.zero_grad(set_to_none=True)

    @torch.no_grad()
    def publish(self) -> None:
        """Write the master weights back into the working model (rounded to its dtype)."""
        if self.pairs:
            torch._foreach_copy_([w for w, _ in self.pairs], [m for _, m in self.pairs])
