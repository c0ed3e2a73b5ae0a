"""Expert initialisation methods, one function each, registered by name (`expert_init=`).

The rewrite first builds the routed experts from the dense FFN (copies, or segments of it: see
`segments.py`), then calls the method named by `UpcycleConfig.expert_init` on them. A method is
`fn(experts, context) -> None`, changing `experts` (an `Experts`) in place; `context` gives the
dense FFN, the config and the random generator. A new method is one function and one
`register_expert_init(name, fn, preserves_function=...)` call; the config then accepts its name.

* `copy`: sparse upcycling (arXiv 2212.05055): the experts stay what they were built as.
* `random`: the paper's from-scratch ablation: every weight matrix drawn N(0, σ²) with σ its own
  std, biases zeroed.
* `drop`: Drop-Upcycling (arXiv 2502.19261): each expert re-draws its own random share
  `drop_ratio` (default 0.5) of its hidden units: their rows of the up (and gate) projection and
  their columns of the down projection are drawn from a normal with the mean and std of the
  original matrix, their up-bias entries likewise from the bias's. `drop_ratio=0` gives copies.

Only `copy` (and `drop` with ratio 0) keeps the dense function at conversion. The methods (and
`expert_noise_std`) apply to the routed experts; shared experts stay as built from the FFN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .experts import Experts, FFNWeights

DEFAULT_DROP_RATIO = 0.5  # the paper's recommended r


@dataclass(frozen=True)
class InitContext:
    """What an initialisation method may read: the dense FFN, the config, the generator."""

    ffn: FFNWeights
    config: object             # UpcycleConfig (not imported: config.py imports this module)
    generator: torch.Generator | None = None


InitFn = Callable[[Experts, InitContext], None]


@dataclass(frozen=True)
class ExpertInit:
    name: str
    fn: InitFn
    preserves_function: Callable[[object], bool]   # config -> whether the result keeps the function


_REGISTRY: dict[str, ExpertInit] = {}


def register_expert_init(name: str, fn: InitFn, *, preserves_function=False) -> None:
    """Make `expert_init=name` run `fn(experts, context)`. `preserves_function`: a bool, or a
    function of the config saying whether the experts still compute the dense FFN (the rewrite
    then checks the result against the dense model)."""
    from ..errors import UpcycleConfigError

    if not isinstance(name, str) or not name.isidentifier():
        raise UpcycleConfigError(f"register_expert_init: name {name!r} must be an identifier such as 'drop'.")
    if not callable(fn):
        raise UpcycleConfigError(f"register_expert_init({name!r}): {fn!r} is not callable.")
    preserves = preserves_function if callable(preserves_function) else (lambda config, v=bool(preserves_function): v)
    _REGISTRY[name] = ExpertInit(name, fn, preserves)


def expert_init_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def expert_init(name: str) -> ExpertInit:
    return _REGISTRY[name]


def initialize_experts(experts: Experts, context: InitContext) -> None:
    """Run the method named by the config on freshly built experts."""
    _REGISTRY[context.config.expert_init].fn(experts, context)


# --------------------------------------------------------------------------- the methods


def copy_init(experts: Experts, context: InitContext) -> None:
    """Keep the experts as built (copies or segments of the dense FFN)."""


def random_init(experts: Experts, context: InitContext) -> None:
    experts.reinitialize(context.generator)


def drop_ratio(config) -> float:
    return DEFAULT_DROP_RATIO if config.drop_ratio is None else float(config.drop_ratio)


def drop_init(experts: Experts, context: InitContext) -> None:
    """Drop-Upcycling: per expert, re-draw a random `drop_ratio` share of its hidden units from
    the statistics of the matrices as built (those of the dense FFN's, times the layout's factor
    on the down projection; the gate and up halves of a gated FFN each from their own), before
    any expert is changed."""
    ratio = drop_ratio(context.config)
    width = experts.d_ff
    dropped = round(ratio * width)
    if dropped == 0 or experts.up_proj.device.type == "meta":
        return
    generator = context.generator
    halves = 2 if experts.gated else 1
    up_stats = [_stats(half) for half in experts.up_proj.detach().chunk(halves, dim=1)]
    down_stats = _stats(experts.down_proj.detach())
    bias_stats = None
    if experts.up_bias is not None:
        bias = experts.up_bias.detach()
        bias_stats = [_stats(half) for half in (bias.chunk(halves, dim=1) if experts.up_bias_half is None else [bias])]
    with torch.no_grad():
        for e in range(experts.num_experts):
            units = torch.randperm(width, generator=generator)[:dropped].to(experts.up_proj.device)
            for h, (mean, std) in enumerate(up_stats):
                rows = units + h * width
                experts.up_proj[e, rows] = _normal((dropped, experts.d_model), mean, std, generator).to(experts.up_proj)
            if bias_stats is not None:
                for h, (mean, std) in enumerate(bias_stats):
                    rows = units + h * width
                    experts.up_bias[e, rows] = _normal((dropped,), mean, std, generator).to(experts.up_bias)
            mean, std = down_stats
            experts.down_proj[e, :, units] = _normal((experts.d_model, dropped), mean, std, generator).to(experts.down_proj)


def _stats(t: torch.Tensor) -> tuple[float, float]:
    t = t.float()
    return float(t.mean()), float(t.std()) if t.numel() > 1 else 0.0


def _normal(shape, mean: float, std: float, generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float32).mul_(std).add_(mean)


register_expert_init("copy", copy_init, preserves_function=True)
register_expert_init("random", random_init, preserves_function=False)
register_expert_init("drop", drop_init, preserves_function=lambda config: drop_ratio(config) == 0)
