"""Pick, among a few input layouts read off a config, the first one the model runs on.

A config gives the sizes of an audio, time-series or video input (mel bins, sample rate, context
length, frames) but not its layout: Whisper-style encoders take mel features as
[batch, mel, frames], conformers as [batch, frames, mel]; some need an exact length, a multiple
of a window, or a mask beside the features. Builders of such inputs list their candidates,
preferred first, each a dict of the forward inputs it implies, and `first_that_runs` keeps the
first one an ordinary forward accepts (no gradients, the model left as found). When none does,
the `CaptureError` names the input, the shapes tried and the last failure.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook

from ..errors import CaptureError

Candidate = dict[str, torch.Tensor]


def forward_parameters(model: nn.Module) -> dict[str, inspect.Parameter]:
    """The named parameters of `model.forward` (no *args / **kwargs)."""
    return {name: p for name, p in inspect.signature(model.forward).parameters.items()
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def required_inputs(model: nn.Module) -> list[str]:
    """Forward parameters without a default value."""
    return [name for name, p in forward_parameters(model).items() if p.default is inspect.Parameter.empty]


def config_int(config: Any, *names: str) -> int | None:
    """The first of `names` set to a positive int on `config` or, failing that, on one of its
    nested configs (audio_config, encoder_config, vision_config, ...)."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    for sub in nested_configs(config):
        value = config_int(sub, *names)
        if value is not None:
            return value
    return None


def nested_configs(config: Any) -> list[Any]:
    """Configs held by `config` (objects with `to_dict`), one level down."""
    return [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "__dict__")]


def unique(values: Iterable[Any]) -> list[Any]:
    """`values` without repeats or Nones, in order."""
    seen: list[Any] = []
    for value in values:
        if value is not None and value not in seen:
            seen.append(value)
    return seen


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else ""


def _like_model(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """On the model's device; floating tensors in its floating dtype (a bf16 model takes bf16)."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.to(device, dtype) if value.is_floating_point() else value.to(device)


def _describe(candidate: Candidate) -> str:
    return ", ".join(f"{k}{list(v.shape)}" for k, v in candidate.items())


def first_that_runs(context, input_name: str, candidates: Iterable[Candidate]) -> Candidate:
    """The first candidate the model's forward runs on (with the decoder inputs an
    encoder-decoder gets and the fixed keyword arguments); CaptureError when none does."""
    from .input_builders import BUILDERS
    from .inputs import hf_fixed_kwargs

    model = context.model
    fixed = hf_fixed_kwargs(model)
    if getattr(context.config, "is_encoder_decoder", False) and "decoder_input_ids" in BUILDERS:
        try:
            fixed["decoder_input_ids"] = BUILDERS["decoder_input_ids"](context)
        except CaptureError:
            pass
    device = next(iter(model.parameters()), torch.empty(0)).device
    _PROBING.add(input_name)
    try:
        return _first_that_runs(context, input_name, candidates, fixed, device)
    finally:
        _PROBING.discard(input_name)


_PROBING: set[str] = set()  # inputs whose builders are probing now: not built again inside


def _other_required(context, candidate: Candidate, built: dict[str, Any]) -> dict[str, Any]:
    """Required forward inputs the candidate lacks, from their own builders (token ids beside
    a video, ...); those that cannot be built are left out and the forward says so."""
    from .input_builders import BUILDERS

    for name in required_inputs(context.model):
        if name in candidate or name in built or name in _PROBING or name not in BUILDERS:
            continue
        try:
            value = BUILDERS[name](context)
        except CaptureError:
            value = None
        if value is not None:
            built.update(value if isinstance(value, dict) else {name: value})
    return {k: v for k, v in built.items() if k not in candidate}


def _first_that_runs(context, input_name, candidates, fixed, device) -> Candidate:
    from .snapshot import left_as_found

    model = context.model
    built: dict[str, Any] = {}
    cuda = [device.index or 0] if device.type == "cuda" else []  # a probe leaves the random state alone
    tried: list[str] = []
    failure = None
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for candidate in _limited(candidates):
        candidate = {k: _like_model(v, device, dtype) for k, v in candidate.items()}
        kwargs = {**fixed, **_other_required(context, candidate, built), **candidate}
        tried.append(_describe(candidate))
        calls = [0]  # modules entered before a failure: how far a layout got
        counter = register_module_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            with left_as_found(model), torch.no_grad(), torch.random.fork_rng(devices=cuda):
                model(**{k: _like_model(v, device, dtype) for k, v in kwargs.items()})
        except CaptureError:
            raise
        except Exception as e:  # noqa: BLE001 - a layout the model refuses: try the next one
            if failure is None or calls[0] > failure[0]:  # the layout that got furthest says most
                failure = (calls[0], f"{type(e).__name__}: {_first_line(e)}")
            continue
        finally:
            counter.remove()
        return candidate
    shown = "; ".join(tried[:4]) + (f"; ... ({len(tried)} in all)" if len(tried) > 4 else "")
    reason = f"the one that runs furthest fails with {failure[1]}" if failure else "none could be made"
    raise CaptureError(
        f"{type(model).__name__}: cannot build example inputs for {input_name!r}: the model runs on "
        f"none of the layouts its config suggests ({shown or 'none'}); {reason}. "
        f"Pass example_inputs={{'{input_name}': tensor, ...}} with the inputs of one ordinary "
        "forward call.")


_MAX_CANDIDATES = 24
_MAX_SECONDS = 30.0  # a model slow to refuse a layout is not tried on every other one


def _limited(candidates: Iterable[Candidate]) -> Iterator[Candidate]:
    start = time.monotonic()
    for index, candidate in enumerate(candidates):
        if index >= _MAX_CANDIDATES or (index and time.monotonic() - start > _MAX_SECONDS):
            return
        yield candidate
