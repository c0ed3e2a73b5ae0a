"""Experts from several checkpoints: an MoE whose expert e is the FFN of fine-tune e.

Branch-Train-MiX (Sukhbaatar et al., 2024) and mergekit-moe's "clown-car" MoEs: fine-tunes of one
dense model each give the FFNs of one expert; everything else (attention, norms, embeddings, the
FFNs left dense) comes from the base model or is the mean of the fine-tunes. The routers are drawn
at random (for training after the merge) or set from the hidden states of a few prompts per
expert (mergekit's `hidden` gate mode), so the merged model routes usefully before any training.
Any architecture the pass converts works: the experts are read through the same FFN patterns.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .api import upcycle
from .capture.inputs import as_model_inputs, check_example_inputs
from .config import MAX_EXPERTS, UpcycleConfig
from .errors import RewriteError, UpcycleConfigError
from .moe import MoE
from .passes.upcycle import dense_weights
from .report import moe_layers

REST = ("base", "average")
ROUTER_INITS = ("random", "hidden")


class ExpertSourceError(UpcycleConfigError):
    """A model given as an expert source is not a fine-tune of the base model (other class or
    other parameter names or shapes)."""


def merge_experts(base: nn.Module, experts: Sequence[nn.Module], *, rest: str = "base",
                  router_init: str = "random", prompts: Sequence[Sequence[Any]] | None = None,
                  negative_prompts: Sequence[Sequence[Any]] | None = None,
                  example_inputs: Any = None, leaf_modules=(), **options) -> nn.Module:
    """An MoE model whose selected FFNs have one expert per model in `experts`.

    `experts`: fine-tunes of `base` (same class, same parameter names and shapes); expert e of
    every MoE layer is fine-tune e's FFN at that place. `rest="base"` keeps every other weight of
    `base`, `"average"` takes their mean over the fine-tunes (Branch-Train-MiX).
    `router_init="random"` draws the routers as `rewrite` does; `"hidden"` sets router row e to
    the mean input of that MoE layer over `prompts[e]` (minus the mean over
    `negative_prompts[e]` if given), scaled to unit norm, computed layer after layer on the merged
    model. Each prompt is one forward call's inputs (a tensor of token ids, a tuple, or a dict
    such as a tokenizer's output). `options` are `UpcycleConfig` fields (`pattern`, `top_k`,
    `routing`, ...); `num_experts` is `len(experts)`. `base` and `experts` are left untouched.
    """
    config = _merge_config(experts, options)
    _check_choice("rest", rest, REST)
    _check_choice("router_init", router_init, ROUTER_INITS)
    _check_sources(base, experts)
    _check_prompts(prompts, negative_prompts, len(experts), router_init)
    result = upcycle(base, config, example_inputs=example_inputs, leaf_modules=leaf_modules)
    model = result.model
    matches = {m.index: m for m in result.converted}
    layers = moe_layers(model)
    with torch.no_grad():
        for _, moe in layers:
            for e, source in enumerate(experts):
                _set_expert(moe, e, dense_weights(matches[moe.mlp_index].site, source))
        if rest == "average":
            _average_rest(model, experts, {name for name, _ in layers})
    if router_init == "hidden":
        _routers_from_prompts(model, layers, prompts, negative_prompts)
    return model


def _merge_config(experts: Sequence[nn.Module], options: dict) -> UpcycleConfig:
    if not isinstance(experts, (list, tuple)) or not experts:
        raise UpcycleConfigError("experts= must be a non-empty list of models (the fine-tunes whose "
                                 "FFNs become the experts).")
    if len(experts) > MAX_EXPERTS:
        raise UpcycleConfigError(f"{len(experts)} expert sources exceed the limit of {MAX_EXPERTS}.")
    if "num_experts" in options and options["num_experts"] != len(experts):
        raise UpcycleConfigError(f"num_experts={options['num_experts']!r} but {len(experts)} expert "
                                 "sources were given: there is one expert per source; leave "
                                 "num_experts out.")
    for name, plain in (("expert_init", "copy"), ("expert_noise_std", 0.0)):
        if options.get(name, plain) != plain:
            raise UpcycleConfigError(f"{name}={options[name]!r}: the experts are the sources' own "
                                     "FFNs, so they are neither re-initialised nor noised; leave "
                                     f"{name} out.")
    options = {**options, "num_experts": len(experts)}
    options.setdefault("top_k", min(2, len(experts)))
    try:
        return UpcycleConfig(**options)
    except TypeError as error:
        raise UpcycleConfigError(f"merge_experts: {error}; the options are UpcycleConfig's fields.") from None


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise UpcycleConfigError(f"{name}={value!r} is unknown; choose one of {choices}.")


def _check_sources(base: nn.Module, experts: Sequence[nn.Module]) -> None:
    """ExpertSourceError unless every source has base's class and parameter names and shapes."""
    if not isinstance(base, nn.Module):
        raise UpcycleConfigError(f"merge_experts(base=...) takes a torch.nn.Module; got a "
                                 f"{type(base).__name__}.")
    shapes = {name: p.shape for name, p in base.named_parameters()}
    for e, source in enumerate(experts):
        where = f"experts[{e}]"
        if not isinstance(source, nn.Module):
            raise ExpertSourceError(f"{where} is a {type(source).__name__}, not a torch.nn.Module.")
        if source is base:
            continue
        if type(source) is not type(base):
            raise ExpertSourceError(f"{where} is a {type(source).__name__}, the base a "
                                    f"{type(base).__name__}: the sources must be fine-tunes of the base.")
        theirs = {name: p.shape for name, p in source.named_parameters()}
        missing, extra = sorted(shapes.keys() - theirs.keys()), sorted(theirs.keys() - shapes.keys())
        if missing or extra:
            raise ExpertSourceError(f"{where} has other parameters than the base (missing {missing[:3]}, "
                                    f"extra {extra[:3]}): the sources must be fine-tunes of the base.")
        differ = [f"{n} {tuple(theirs[n])} vs {tuple(s)}" for n, s in shapes.items() if theirs[n] != s]
        if differ:
            raise ExpertSourceError(f"{where}: parameter shapes differ from the base's "
                                    f"({'; '.join(differ[:3])}): the sources must be fine-tunes of the base.")


def _check_prompts(prompts, negative_prompts, count: int, router_init: str) -> None:
    if router_init != "hidden":
        if prompts is not None or negative_prompts is not None:
            raise UpcycleConfigError("prompts= are read only with router_init='hidden'.")
        return
    for name, value, required in (("prompts", prompts, True), ("negative_prompts", negative_prompts, False)):
        if value is None and not required:
            continue
        if not isinstance(value, (list, tuple)) or len(value) != count:
            raise UpcycleConfigError(f"router_init='hidden' needs {name}= as a list of {count} lists "
                                     "of prompts, one list per expert source.")
        for e, group in enumerate(value):
            if not isinstance(group, (list, tuple)) or (required and not group):
                raise UpcycleConfigError(f"{name}[{e}] must be a {'non-empty ' if required else ''}list "
                                         "of prompts (token-id tensors or tokenizer outputs).")
            for prompt in group:
                check_example_inputs(prompt)


def _set_expert(moe: MoE, e: int, ffn) -> None:
    """Expert e's stacked weights := the FFN `ffn` (in the layout `Experts` stores)."""
    experts = moe.experts
    pairs = [(experts.up_proj, ffn.up), (experts.up_bias, ffn.up_bias),
             (experts.down_proj, ffn.down), (experts.down_bias, ffn.down_bias)]
    for stacked, dense in pairs:
        if stacked is not None:
            if dense is None or dense.shape != stacked.shape[1:]:
                raise RewriteError(f"{moe.source}: the source's FFN does not fit the experts' layout "
                                   f"({None if dense is None else tuple(dense.shape)} vs "
                                   f"{tuple(stacked.shape[1:])}).")
            stacked[e].copy_(dense)


def _average_rest(model: nn.Module, experts: Sequence[nn.Module], moe_paths: set[str]) -> None:
    """Every parameter outside the MoE layers := its mean over the sources (float32 sum)."""
    for name, param in model.named_parameters():
        if any(name.startswith(path + ".") for path in moe_paths):
            continue
        try:
            values = [source.get_parameter(name) for source in experts]
        except AttributeError:
            raise RewriteError(f"rest='average': the upcycled model's parameter {name!r} has no "
                               "counterpart in the sources; use rest='base'.") from None
        mean = torch.stack([v.detach().float().to(param.device) for v in values]).mean(0)
        param.copy_(mean.to(param.dtype))


class _Reached(Exception):
    """Raised by the capture hook: the forward got as far as it needed to."""


def _routers_from_prompts(model: nn.Module, layers, prompts, negative_prompts) -> None:
    """Router row e of each MoE := unit-norm mean of that layer's input over prompts[e]
    (minus the negatives' mean), layer after layer, so each layer sees its input as routed by the
    layers before it."""
    device = next(iter(model.parameters())).device
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        for _, moe in layers:
            rows = [_mean_input(model, moe, group, device) for group in prompts]
            if negative_prompts is not None:
                rows = [row - _mean_input(model, moe, group, device) if group else row
                        for row, group in zip(rows, negative_prompts)]
            weight = torch.stack(rows)
            norm = weight.norm(dim=-1, keepdim=True)
            if not bool(torch.isfinite(weight).all()) or bool((norm == 0).any()):
                raise RewriteError(f"{moe.source}: the prompts give a zero or non-finite mean hidden "
                                   "state for some expert; give other (or more) prompts.")
            with torch.no_grad():
                moe.router.weight.copy_((weight / norm).to(moe.router.weight.dtype))
    finally:
        for module, training in modes:
            module.training = training


def _mean_input(model: nn.Module, moe: MoE, group, device) -> torch.Tensor:
    """Mean over the tokens of all prompts in `group` of the input `moe` receives, float32."""
    total, count = None, 0

    def grab(_module, args):
        nonlocal total, count
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        total = x.sum(0) if total is None else total + x.sum(0)
        count += x.shape[0]
        raise _Reached

    handle = moe.register_forward_pre_hook(grab)
    try:
        for prompt in group:
            inputs = as_model_inputs(prompt)
            args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in inputs.args)
            kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.kwargs.items()}
            try:
                with torch.no_grad():
                    model(*args, **kwargs)
            except _Reached:
                continue
            raise RewriteError(f"{moe.source}: a prompt's forward did not reach this MoE layer.")
    finally:
        handle.remove()
    return total / count
