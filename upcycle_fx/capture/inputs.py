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
    """Small deterministic inputs built from the model's config, one builder per forward input
    (`input_builders.BUILDERS`), that the model runs on.

    First the inputs the forward requires: its parameters without a default, its
    `main_input_name` when the forward takes it, `decoder_input_ids` for an encoder-decoder.
    When the model does not run on those alone (a CLIP-style model needs its images too), every
    optional input that has a builder is added. CaptureError when no set runs, naming the inputs
    built and why the forward refused them."""
    from .input_builders import BUILDERS, InputContext
    from .input_probe import forward_parameters, required_inputs

    if type(model).forward is nn.Module.forward:
        raise CaptureError(f"{type(model).__name__} has no forward to capture (it is used through "
                           "its submodules or generate()): upcycle one of its submodules instead.")
    required, optional = forward_inputs(model)
    context = InputContext(model, model.config, torch.Generator().manual_seed(_SEED), batch, seq,
                           parameters=tuple(required + optional))
    first = first_inputs(model, required, optional)
    candidates = [_build(model, context, first, strict=True)]
    extra = [name for name in optional if name not in first and name in BUILDERS]
    if extra:
        fuller = {**candidates[0].kwargs, **_build(model, context, extra, strict=False).kwargs}
        if fuller.keys() != candidates[0].kwargs.keys():
            candidates.append(ModelInputs((), fuller))
    if any(p.is_meta for p in model.parameters()):  # a skeleton: nothing to run the guess on
        return candidates[0]
    unbuilt = [name for name in required + optional if name not in BUILDERS and name not in _SETTINGS]
    return _first_that_runs(model, [trial for inputs in candidates
                                     for trial in [inputs, *_layouts(context, inputs)]], unbuilt)


_SETTINGS = frozenset({"return_dict", "use_cache", "output_attentions", "output_hidden_states",
                       "labels", "past_key_values", "cache_position", "logits_to_keep", "return_loss",
                       "interpolate_pos_encoding", "inputs_embeds", "decoder_inputs_embeds"})


def forward_inputs(model: nn.Module) -> tuple[list[str], list[str]]:
    """(required, optional) names of the forward's parameters, `*args`/`**kwargs` left out."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    params = [p for p in inspect.signature(model.forward).parameters.values() if p.kind not in variadic]
    return ([p.name for p in params if p.default is inspect.Parameter.empty],
            [p.name for p in params if p.default is not inspect.Parameter.empty])


def first_inputs(model: nn.Module, required: list[str], optional: list[str]) -> list[str]:
    """The inputs tried first: the required ones, the declared main input when the forward takes
    it (or takes only `**kwargs`), `decoder_input_ids` of an encoder-decoder."""
    names = list(required)
    main = getattr(model, "main_input_name", "input_ids")
    for name in reversed(list(main) if isinstance(main, (list, tuple)) else [main]):
        if name not in names and (name in optional or not (required or optional)):
            names.insert(0, name)
    if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in optional:
        names.append("decoder_input_ids")
    return names


def _build(model: nn.Module, context, names: list[str], strict: bool) -> ModelInputs:
    """The builders' tensors for `names`, on the model's device, floats in its dtype; with
    `strict`, CaptureError for a name that cannot be built, else that name is left out."""
    from .input_builders import BUILDERS

    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    kwargs: dict[str, Any] = {}
    for name in names:
        if name in kwargs:  # already built beside another input (a mask, paired features)
            continue
        builder, reason = BUILDERS.get(name), "no example-input builder knows that input"
        tensor = None
        if builder is not None:
            reason = "its config does not say enough to build it"
            try:
                tensor = builder(context)
            except CaptureError as error:
                reason = str(error).split("; pass example_inputs", 1)[0]
            except Exception as error:  # noqa: BLE001 - the model's config refused a read (a validating property)
                reason = f"reading its config failed: {type(error).__name__}: {str(error).splitlines()[0]}"
        if tensor is None:
            if strict:
                raise CaptureError(
                    f"{type(model).__name__}: cannot build example inputs for its forward input "
                    f"{name!r} ({reason}); pass example_inputs={{'{name}': tensor, ...}} with the "
                    "inputs of one ordinary forward call.")
            continue
        built = tensor if isinstance(tensor, Mapping) else {name: tensor}  # an input and its companions
        for key, value in built.items():
            if value.is_floating_point() and param is not None:
                value = value.to(param.dtype)
            kwargs[key] = value.to(device)
    return ModelInputs((), kwargs)


def _layouts(context, inputs: ModelInputs) -> list[ModelInputs]:
    """`inputs` with one input in another layout its builder offers (`input_variants`)."""
    from .input_builders import VARIANTS

    trials = []
    for name, tensor in inputs.kwargs.items():
        for other in VARIANTS[name](context, tensor) if name in VARIANTS else []:
            trials.append(ModelInputs((), {**inputs.kwargs, name: other}))
    return trials


def _depth(refusal: CaptureError) -> int:
    """How deep in the module tree the forward failed: 0 for the model's own forward."""
    where = str(refusal).split(" fails in ", 1)[-1].split(" ", 1)[0]
    return 0 if where == "<model>" else where.count(".") + 1


def _describe(inputs: ModelInputs) -> str:
    return ", ".join(f"{name} {list(value.shape)}" for name, value in inputs.kwargs.items())


def _first_that_runs(model: nn.Module, candidates: list[ModelInputs], unbuilt: list[str]) -> ModelInputs:
    """The first candidate the model runs on (the model left as found); CaptureError naming the
    inputs built, where the forward refused them and why, and the inputs no builder knows. The
    refusal told is of the fullest set in its first layout or, when the model's forward itself
    refused that layout (an input check), in the layout that ran deepest into the model."""
    from .regions import record_module_inputs
    from .snapshot import left_as_found

    fixed = hf_fixed_kwargs(model)
    refusals = []
    for inputs in candidates:
        try:
            with left_as_found(model):
                record_module_inputs(model, ModelInputs((), {**fixed, **inputs.kwargs}))
            return inputs
        except CaptureError as refused:
            refusals.append((refused, inputs))
    fullest = [r for r in refusals if r[1].kwargs.keys() == refusals[-1][1].kwargs.keys()]
    error, refused_set = fullest[0]  # its first layout, unless the forward's own check refused it
    if _depth(error) == 0:
        error, refused_set = max(fullest, key=lambda r: _depth(r[0]))
    text = str(error)
    where = text.split("example_inputs ", 1)[-1].split(". Pass inputs", 1)[0]
    missing = f"; it also takes {', '.join(unbuilt)}, which no builder makes" if unbuilt else ""
    raise CaptureError(
        f"{type(model).__name__}: the example inputs built from its config ({_describe(refused_set)}) "
        f"do not run: the forward {where}{missing}. Pass example_inputs={{...}} with the inputs of "
        "one ordinary forward call.") from error


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
