"""The dispatch core shared by every routing: assignments in, combined expert outputs out.

One contract, `out[t] = Σ_{(t, e, w)} w · expert_e(x[t])`, three implementations:
* `loop`: a plain loop over experts, the test oracle (syncs with the host; slow);
* `grouped`: stable sort of the assignments by expert, gather, one grouped matmul per
  projection (`grouped_mm` where it applies), weighted scatter-add; for dropless top-k;
* `batched`: the static [E, C] slot table of capacity routings (expert choice, capped
  top-k) as one batched matmul per projection; no sort, shapes fixed by T, E and C;
* `decode`: one Triton kernel that runs up projection, activation and down projection without
  writing the hidden units (`triton_decode.py`; one program per assignment for a handful of
  them, else one per expert that finds its rows itself), for small batches at inference, where
  the grouped path's ~15 kernel launches cost more than reading the chosen experts' weights.
`auto` picks `batched` when the routing has slots; else `decode` on CUDA when nothing needs a
gradient, there are at most DECODE_MAX_ROWS assignments and no more than
DECODE_AUTO_ROWS_PER_EXPERT per chosen expert on average (beyond that the decode kernel's
atomic adds of the output cost more than the grouped path's launches), and the kernel knows the
activation (and Triton is installed, and torch.compile is not tracing); else `grouped`. Neither fast path reads
anything back to the host when `grouped_mm` applies (see `grouped.py`).
"""

from __future__ import annotations

import torch

from .experts import Experts
from .grouped import _triton_available
from .routing import Routing, expert_counts

IMPLEMENTATIONS = ("auto", "grouped", "batched", "decode", "loop")
DECODE_MAX_ROWS = 512   # T·k assignments: all of them make one tile of the decode kernel
DECODE_AUTO_ROWS_PER_EXPERT = 16  # auto: at most this many assignments per chosen expert on average
DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dispatch(x: torch.Tensor, routing: Routing, experts: Experts, impl: str = "auto") -> torch.Tensor:
    """Combine the experts' outputs for tokens x: [T, D] according to `routing`.

    `experts`: an `Experts`, or any object with its `num_experts`, `forward_grouped`,
    `forward_batched` and `forward_expert` (the expert-parallel adapter of
    `upcycle_fx.distributed` runs `Experts`' own methods on each rank's experts between two
    all-to-alls, so this core stays the only one).
    """
    if impl == "auto":
        impl = "batched" if routing.slots is not None else "decode" if _decode_applies(x, routing, experts) else "grouped"
    if impl == "decode":
        problem = _decode_problem(x, routing, experts)
        if problem:
            raise ValueError(f"the 'decode' dispatch cannot take this call: {problem}; use 'grouped'")
        from .triton_decode import decode_experts

        return decode_experts(x, routing.token_idx, routing.expert_idx, routing.weight, experts)
    if impl == "grouped":
        return _dispatch_grouped(x, routing, experts)
    if impl == "batched":
        if routing.slots is None:
            raise ValueError("the 'batched' dispatch needs a capacity routing (expert choice, or "
                             "top-k with capacity_factor); use 'grouped' for dropless top-k")
        return _dispatch_batched(x, routing, experts)
    if impl == "loop":
        return _dispatch_loop(x, routing, experts)
    raise ValueError(f"unknown dispatch implementation {impl!r}; choose one of {IMPLEMENTATIONS}")


def _decode_applies(x: torch.Tensor, routing: Routing, experts) -> bool:
    """Whether `auto` takes the Triton decode path: CUDA inference on a few assignments."""
    if not x.is_cuda or torch.compiler.is_compiling() or not _triton_available():
        return False
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in experts.parameters()))
    rows = routing.expert_idx.numel()
    few_per_expert = rows <= DECODE_AUTO_ROWS_PER_EXPERT * min(rows, experts.num_experts)
    return not needs_grad and few_per_expert and _decode_problem(x, routing, experts) is None


def _decode_problem(x: torch.Tensor, routing: Routing, experts) -> str | None:
    """What keeps the decode kernel from this call, or None."""
    if not _triton_available():
        return "Triton is not installed"
    if not isinstance(experts, Experts):
        return "it takes the experts of one process (an `Experts`)"
    if experts.up_bias_half is not None:
        return "its bias layout covers all rows of the up projection, these experts have a bias on one half only"
    if routing.slots is not None:
        return "capacity routings (with dropped assignments or empty slots) take the 'batched' path"
    if routing.expert_idx.numel() > DECODE_MAX_ROWS:
        return f"it takes at most {DECODE_MAX_ROWS} assignments (got {routing.expert_idx.numel()})"
    if x.dtype not in DECODE_DTYPES or experts.up_proj.dtype != x.dtype:
        return f"it runs float32, float16 and bfloat16 with experts of the input's dtype (got {x.dtype}, experts {experts.up_proj.dtype})"
    from .triton_decode import kernel_activation

    return kernel_activation(experts)


def _accumulator(x: torch.Tensor) -> torch.Tensor:
    """Outputs are summed in float32 at least (float64 stays float64)."""
    return torch.zeros(x.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


def _combine(x: torch.Tensor, tokens: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
             used: torch.Tensor) -> torch.Tensor:
    """out[tokens[i]] += weight[i] · y[i] where `used[i]`, accumulated in float32 (float64 stays
    float64), returned in x's dtype. Unused rows (dropped assignments, empty slots) add exactly
    nothing, even where their y is not finite."""
    out = _accumulator(x)
    contribution = torch.where(used[:, None], y.to(out.dtype) * weight[:, None].to(out.dtype), 0.0)
    return out.index_add_(0, tokens, contribution).to(x.dtype)


def _dispatch_loop(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    out = _accumulator(x)
    for expert in range(experts.num_experts):
        rows = (routing.expert_idx == expert).nonzero().squeeze(-1)
        if rows.numel() == 0:
            continue
        rows = rows[routing.kept[rows]]
        tokens = routing.token_idx[rows]
        y = experts.forward_expert(expert, x[tokens]).to(out.dtype)
        out.index_add_(0, tokens, y * routing.weight[rows, None].to(out.dtype))
    return out.to(x.dtype)


def _dispatch_grouped(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    order = torch.argsort(routing.expert_idx, stable=True)
    expert_sorted = routing.expert_idx[order]
    token_sorted = routing.token_idx[order]
    counts = expert_counts(expert_sorted, experts.num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    y = experts.forward_grouped(x[token_sorted], expert_sorted, offsets, counts)
    return _combine(x, token_sorted, y, routing.weight[order], routing.kept[order])


def _dispatch_batched(x: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    slots = routing.slots
    num_experts, capacity = slots.token.shape
    tokens, filled = slots.token.reshape(-1), slots.filled.reshape(-1)
    rows = torch.where(filled[:, None], x[tokens], 0.0)  # empty slots run on zeros, not on token 0
    y = experts.forward_batched(rows.view(num_experts, capacity, -1))
    return _combine(x, tokens, y.reshape(num_experts * capacity, -1), slots.weight.reshape(-1), filled)
