"""Example inputs: the user's, ones built from a Hugging Face model's own config, or (for
verification only) ones built from the first layer a plain module's inputs reach."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError, UpcycleConfigError

_SEED = 0
_BATCH, _SEQ, _DECODER_SEQ = 2, 8, 5


@dataclass
class ModelInputs:
    """Positional and keyword arguments of one forward call."""

    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def call(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in pytree.tree_leaves((self.args, self.kwargs)) if isinstance(x, torch.Tensor)]


def is_hf_model(model: nn.Module) -> bool:
    """A transformers `PreTrainedModel` (checked without importing transformers)."""
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers")
               for c in type(model).__mro__)


def check_example_inputs(example_inputs: Any) -> None:
    """UpcycleConfigError unless `example_inputs` is None, a tensor, a tuple/list of positional
    args or a mapping of keyword args (a tokenizer's BatchEncoding too) holding a tensor."""
    if example_inputs is None:
        return
    if not isinstance(example_inputs, (torch.Tensor, tuple, list, Mapping, ModelInputs)):
        raise UpcycleConfigError(
            f"example_inputs of type {type(example_inputs).__name__} is not understood: pass a "
            "tensor, a tuple of positional arguments, or a dict of keyword arguments for one "
            "forward call.")
    if not as_model_inputs(example_inputs).tensors():
        raise UpcycleConfigError("example_inputs holds no tensor: pass the tensors of one forward "
                                 "call (a tensor, a tuple of positional arguments, or a dict).")


def as_model_inputs(example_inputs: Any) -> ModelInputs:
    """Accept a tensor, a tuple/list of positional args, a dict of kwargs, or ModelInputs."""
    if isinstance(example_inputs, ModelInputs):
        return example_inputs
    if isinstance(example_inputs, Mapping):
        return ModelInputs((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return ModelInputs(tuple(example_inputs), {})
    return ModelInputs((example_inputs,), {})


def resolve_inputs(model: nn.Module, example_inputs: Any = None) -> ModelInputs | None:
    """The inputs to capture with: the user's, an HF model's own, or None (symbolic capture)."""
    if example_inputs is not None:
        inputs = as_model_inputs(example_inputs)
    elif is_hf_model(model):
        inputs = hf_example_inputs(model)
    else:
        return None
    if is_hf_model(model):
        inputs = ModelInputs(inputs.args, {**hf_fixed_kwargs(model), **inputs.kwargs})
    return inputs


def hf_fixed_kwargs(model: nn.Module) -> dict[str, Any]:
    """No KV cache objects in the graph, plain tuples out."""
    params = inspect.signature(model.forward).parameters
    fixed = {"return_dict": False}
    if "use_cache" in params:
        fixed["use_cache"] = False
    return fixed


def hf_example_inputs(model: nn.Module, batch: int = _BATCH, seq: int = _SEQ) -> ModelInputs:
    """Small deterministic inputs from the model's config for `main_input_name` and every other
    input the forward requires, one builder per input name (`input_builders.BUILDERS`); a
    builder may return a dict: its input and the inputs that go with it (a mask, a length)."""
    from .input_builders import BUILDERS, InputContext
    from .input_probe import forward_parameters, required_inputs

    context = InputContext(model, model.config, torch.Generator().manual_seed(_SEED), batch, seq)
    device = next(iter(model.parameters()), torch.empty(0)).device
    main = getattr(model, "main_input_name", "input_ids")
    main = list(main) if isinstance(main, (list, tuple)) else [main]
    required = required_inputs(model)
    names = [n for n in main if n in forward_parameters(model) or not required]
    names += [n for n in required if n not in names]
    if getattr(model.config, "is_encoder_decoder", False):
        names.append("decoder_input_ids")
    kwargs: dict[str, Any] = {}
    for input_name in names:
        if input_name in kwargs:  # already built beside another input (a mask, paired features)
            continue
        builder = BUILDERS.get(input_name)
        built = None if builder is None else builder(context)
        if built is None:
            raise CaptureError(
                f"{type(model).__name__}: cannot build example inputs for its input "
                f"{input_name!r}; pass example_inputs={{'{input_name}': tensor, ...}} to capture it.")
        kwargs.update(built if isinstance(built, Mapping) else {input_name: built})
    return ModelInputs((), {k: v.to(device) for k, v in kwargs.items()})


def synthesize_inputs(model: nn.Module, captured, batch: int = _BATCH,
                      seq: int = _DECODER_SEQ) -> ModelInputs | None:
    """Inputs for a plain module captured symbolically, read off the first module each input
    reaches: token ids below `num_embeddings` for an `nn.Embedding`, a float [batch, seq, d]
    tensor (the layer's dtype and device) for a Linear or a norm over d, images of the
    size the model declares (timm) for a Conv2d. None when an input
    has no such first consumer, or the model does not run on the guess."""
    if captured is None or len(captured.regions) != 1 or captured.regions[0].prefix or captured.regions[0].inner:
        return None
    region = captured.regions[0]
    generator = torch.Generator().manual_seed(_SEED)
    args = []
    for node in [n for n in region.graph.nodes if n.op == "placeholder"]:
        if node.args:  # a parameter with a default value: keep the default
            break
        module = _first_module_user(node, region.root)
        tensor = None if module is None else _input_for(module, (batch, seq), generator, model)
        if tensor is None:
            return None
        args.append(tensor)
    inputs = ModelInputs(tuple(args))
    from .snapshot import left_as_found

    try:
        with left_as_found(model), torch.no_grad():
            inputs.call(model.eval())
    except Exception:  # noqa: BLE001 - a wrong guess means "no inputs", not an error
        return None
    return inputs


def _first_module_user(node, root: nn.Module) -> nn.Module | None:
    """The module of the first call_module node the placeholder reaches directly."""
    users = sorted(node.users, key=lambda n: n.meta.get("order", 0))
    for user in users:
        if user.op == "call_module" and user.args and user.args[0] is node:
            return root.get_submodule(user.target)
    return None


def _input_for(module: nn.Module, shape: tuple[int, int], generator: torch.Generator,
               model: nn.Module):
    weight = next(iter(module.parameters()), None)
    if weight is None:
        return None
    if isinstance(module, nn.Conv2d):
        size = _declared_image_size(model)
        if size is None:
            return None
        return torch.randn(shape[0], module.in_channels, *size, generator=generator).to(
            weight.device, weight.dtype)
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, shape, generator=generator).to(weight.device)
    if isinstance(module, nn.Linear):
        width = module.in_features
    elif isinstance(getattr(module, "normalized_shape", None), tuple) and len(module.normalized_shape) == 1:
        width = module.normalized_shape[0]
    else:
        return None
    return torch.randn(*shape, width, generator=generator).to(weight.device, weight.dtype)


def _declared_image_size(model: nn.Module) -> tuple[int, int] | None:
    """(height, width) a vision model declares: timm's `patch_embed.img_size` (what the model
    was built for), else its `pretrained_cfg["input_size"]`."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size", (None,))[1:] if isinstance(cfg, dict) else None
    if isinstance(size, int):
        size = (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return tuple(size)
    return None
