"""Which hidden units of the dense FFN each expert holds: whole copies, segments, shared experts.

The FFN computes `y = Σ_j down[:, j] · h_j(x) + b` over its d_ff hidden units j. Split the
units into G segments of d_ff/G (fine-grained experts, arXiv 2410.07524; LLaMA-MoE's neuron
split is the case of one copy of each segment) and write `seg_g(x)` for the sum over segment g,
so `y = Σ_g seg_g(x) + b`.

Routed experts (no shared experts): expert i holds segment `i mod G`, so experts
`v·G .. v·G+G-1` (virtual group v) hold one copy of every segment. The router rows are equal
within each virtual group (`tie_router_groups`), so a group's G experts get equal logits and
equal weights, and top-K with K a multiple of G picks whole groups. With renormalised weights the
chosen weights sum to 1, so the K/G chosen groups carry weights `w_v` with `G · Σ_v w_v = 1`;
every expert's down projection is scaled by G, and the layer computes
`Σ_v w_v · G · Σ_g seg_g(x) + b = y`: the dense function, for any activation (only the down
projection, which is linear, is scaled; the down bias, weighted by weights summing to 1, is not).
Where K is not a multiple of G, or the weights are not renormalised, a token may get part of a
group, and the function is not kept.

Shared experts (always active, DeepSeekMoE / Qwen2-MoE), n of them, each as wide as a routed
expert, stored as one FFN of n·d_ff/G units:
* granularity G > n: the first n segments become the shared experts and the routed experts are
  copies of the other G-n segments (virtual groups of G-n, down projections scaled by G-n), so
  shared plus routed is again the sum over all segments;
* granularity 1: the shared experts are n copies of the whole FFN; every copy, shared or routed,
  carries 1/(n+1) of the function (down projections scaled by 1/(n+1)).
A sigmoid gate on the shared experts (Qwen2-MoE) starts at weight 0, i.e. a factor of 1/2, which
their down projections are scaled by 2 to undo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def routed_group_size(granularity: int, num_shared: int) -> int:
    """Routed segments per FFN: the size of a virtual group of equal router rows."""
    if granularity == 1:
        return 1
    return granularity - num_shared


@dataclass(frozen=True)
class ExpertLayout:
    """The dense hidden units each expert holds, and the factor on its down projection.

    routed_units: [N, d_ff/G] indices of the dense FFN's hidden units, one row per routed expert;
    shared_units: [n·d_ff/G] (or None): the shared experts' units, as one FFN;
    group_size: routed experts in a virtual group (equal router rows).
    """

    routed_units: torch.Tensor
    routed_scale: float
    shared_units: torch.Tensor | None
    shared_scale: float
    group_size: int

    @property
    def expert_width(self) -> int:
        return self.routed_units.shape[1]


def layout_problem(d_ff: int, granularity: int) -> str | None:
    """Why an FFN of d_ff hidden units cannot be split into `granularity` segments, or None."""
    if d_ff % granularity:
        return (f"its {d_ff} hidden units do not split into granularity={granularity} equal segments; "
                f"use a granularity that divides {d_ff}")
    return None


def expert_layout(d_ff: int, num_experts: int, granularity: int, num_shared: int = 0,
                  shared_gate: bool = False) -> ExpertLayout:
    """The layout of the module docstring (the config has checked the counts; d_ff is checked here)."""
    problem = layout_problem(d_ff, granularity)
    if problem:
        raise ValueError(problem)
    width = d_ff // granularity
    segments = torch.arange(d_ff).view(granularity, width)
    gate_factor = 2.0 if shared_gate else 1.0
    if granularity == 1:
        share = 1.0 / (num_shared + 1)
        routed = segments.expand(num_experts, width)
        shared = segments[0].repeat(num_shared) if num_shared else None
        return ExpertLayout(routed, share, shared, share * gate_factor, 1)
    group = routed_group_size(granularity, num_shared)
    routed_segments = segments[num_shared:]
    routed = routed_segments[torch.arange(num_experts) % group]
    shared = segments[:num_shared].reshape(-1) if num_shared else None
    return ExpertLayout(routed, float(group), shared, gate_factor, group)


def tie_router_groups(weight: torch.Tensor, group_size: int) -> None:
    """Make the router rows equal within each virtual group of `group_size` experts (in place):
    group v takes the row drawn for its first expert, so the rows stay N(0, σ²) draws."""
    if group_size > 1:
        with torch.no_grad():
            weight.copy_(weight[::group_size].repeat_interleave(group_size, dim=0))
