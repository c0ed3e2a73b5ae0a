"""`save_pretrained` / `from_pretrained` of upcycled transformers models, through the quantizer
registry `transformers` offers for third-party module swaps.

Every use of transformers internals by upcycle_fx's integrations is in this module.

Saving: the upcycled model's config carries `quantization_config` (an
`UpcycleQuantizationConfig`: the manifest of which FFNs became which MoE layers, see
`exporters/manifest.py`), so the stock `save_pretrained` (Trainer checkpoints, `push_to_hub`)
writes it into `config.json` with no extra call.

Loading: `from_pretrained` finds `quant_method: "upcycle_fx"`, builds the dense skeleton on the
meta device and hands it to `UpcycleHfQuantizer`, which rewrites it as the record says
(`manifest.rebuild`) before the weights are read; the weights then load under their own names,
bit for bit. Afterwards the model is an ordinary upcycled model again (not marked quantized, so
`Trainer`, `.half()` and `.to()` treat it as any other model).

Refusing: transformers skips an unknown `quant_method` with a warning and would build the dense
model with random FFNs. So the config also names a fusion that only exists while upcycle_fx is
imported (`fusion_config`, which `from_pretrained` validates before building the model and
rejects when unknown). Importing upcycle_fx registers that name as a fusion that fuses nothing,
and the quantizer also removes it from the config where it sees the config first, so loading
works whichever of the two steps a transformers version runs first. Without upcycle_fx, stock
transformers (versions with `fusion_config`) stops with `ValueError: Unknown fusion type:
upcycle_fx ...`, whatever class loads it; older versions only warn about the unknown
quantization method.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, replace
from functools import partial
from typing import Any

from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.modeling_utils import PreTrainedModel
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import UpcycleError
from ..exporters.errors import CheckpointMismatchError
from ..exporters.manifest import Manifest, describe, rebuild
from ..exporters.state import tensor_table
from . import QUANT_METHOD
from .aux_loss import installed_hook, set_aux_loss_in_output

REFUSAL = ("upcycle_fx: this checkpoint is a sparse MoE model made by upcycle_fx; pip install "
           "upcycle_fx and `import upcycle_fx` before from_pretrained to load it")


class UpcycleQuantizationConfig(QuantizationConfigMixin):
    """`config.quantization_config` of an upcycled model: its manifest (without the dense config,
    which is the rest of `config.json`) and whether the training loss includes the aux losses."""

    def __init__(self, manifest: dict[str, Any], aux_loss_in_output: bool = True,
                 quant_method: str = QUANT_METHOD, **unknown: Any) -> None:
        if unknown:
            raise CheckpointMismatchError(
                f"quantization_config has fields {sorted(unknown)} that this upcycle_fx does not know "
                "(written by a newer version?); upgrade upcycle_fx to load it.")
        self.quant_method = quant_method
        self.manifest = manifest
        self.aux_loss_in_output = aux_loss_in_output

    @classmethod
    def of(cls, model: nn.Module, aux_loss_in_output: bool = True) -> "UpcycleQuantizationConfig":
        manifest = replace(describe(model, tensor_table(model)), hf_config=None)
        return cls(asdict(manifest), aux_loss_in_output)

    def record(self) -> Manifest:
        """The manifest, validated (format and version) as a native checkpoint's is."""
        return Manifest.from_json(json.dumps(self.manifest), "config.json quantization_config")


class UpcycleHfQuantizer(HfQuantizer):
    """Rebuilds the MoE layers on the meta skeleton before `from_pretrained` loads the weights."""

    requires_calibration = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise UpcycleError(
                "UpcycleQuantizationConfig only loads checkpoints saved from upcycled models; to "
                "upcycle a dense model, load it as usual and call upcycle_fx.rewrite(model).")

    def update_attn_implementation(self, config):
        """The one hook that sees the config before the model is built: drop the refusal."""
        fusions = getattr(config, "fusion_config", None)
        if isinstance(fusions, dict) and REFUSAL in fusions:
            rest = {k: v for k, v in fusions.items() if k != REFUSAL}
            config.fusion_config = rest or None
        return config

    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        record = _aligned(self.quantization_config.record(), model)
        rebuilt = rebuild(record, model, inplace=True)
        if rebuilt is not model:
            raise CheckpointMismatchError(f"{type(model).__name__}: the upcycled model is not the "
                                          "one from_pretrained built; load it with upcycle_fx.load.")
        _skip_init_of_ffn_hosts(model, record)
        _ignore_stored_buffers(model, record)
        return model

    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        set_aux_loss_in_output(model, self.quantization_config.aux_loss_in_output)
        _unmark_quantized(model)
        attach_record(model, self.quantization_config)
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _aligned(record: Manifest, model: nn.Module) -> Manifest:
    """The record with module paths as `model` names them: a checkpoint of a model with a head
    loads into the bare model (and back) the way transformers moves between the two."""
    prefix = getattr(model, "base_model_prefix", "")
    paths = [r.path for r in record.moe_layers]
    if not prefix or not paths or _has_all(model, paths):
        return record
    for move in (partial(_without_prefix, prefix), partial(_with_prefix, prefix)):
        if _has_all(model, [move(p) for p in paths]):
            return replace(record, moe_layers=[replace(r, path=move(r.path)) for r in record.moe_layers],
                           folded={move(k): move(v) for k, v in record.folded.items()},
                           spliced=[move(p) for p in record.spliced], other_mode=[])
    return record  # rebuild names the layers it cannot find


def _without_prefix(prefix: str, path: str) -> str:
    return path.removeprefix(prefix + ".")


def _with_prefix(prefix: str, path: str) -> str:
    return f"{prefix}.{path}"


def _has_all(model: nn.Module, paths: list[str]) -> bool:
    names = dict(model.named_modules())
    return all(p in names for p in paths)


def _skip_init_of_ffn_hosts(model: nn.Module, record: Manifest) -> None:
    """Mark the modules that held a converted FFN as initialised (transformers' own flag).

    After loading, transformers runs the model's `_init_weights` on every module not so marked;
    for a module like GPT-2's `GPT2MLP` it reaches for `c_proj.weight`, which now lives in the
    MoE. Only modules without tensors of their own are marked, so nothing is left uninitialised.
    """
    paths = [r.path for r in record.moe_layers] + list(record.folded)
    for path in {p.rpartition(".")[0] for p in paths}:
        host = model.get_submodule(path)
        own = [*host.parameters(recurse=False), *host.buffers(recurse=False)]
        if not own:
            host._is_hf_initialized = True


def _ignore_stored_buffers(model: nn.Module, record: Manifest) -> None:
    """A native checkpoint (`upcycle_fx.save`) also stores the non-persistent buffers, which
    transformers recomputes rather than reads: no 'unexpected keys' report for them."""
    patterns = {rf"(^|\.){re.escape(name)}$" for name in record.non_persistent}
    model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | patterns


def _unmark_quantized(model: PreTrainedModel) -> None:
    """Undo what the quantizer machinery marks: the weights are plain tensors, trainable and
    castable, and the model must compute exactly what the saved one computed."""
    for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and "_is_quantized" in module.config.__dict__:
            del module.config._is_quantized


def attach_record(model: nn.Module, record: UpcycleQuantizationConfig | None = None) -> None:
    """Give an upcycled transformers model the config fields `save_pretrained` must write."""
    if not isinstance(model, PreTrainedModel):
        return
    config = model.config
    hook = installed_hook(model)
    if hook is not None:
        hook.shifts_labels = _shifts_labels(model)
    config.quantization_config = record or UpcycleQuantizationConfig.of(model, _aux_flag(model))
    fusions = dict(getattr(config, "fusion_config", None) or {})
    config.fusion_config = {REFUSAL: True, **fusions}


def _shifts_labels(model: PreTrainedModel) -> bool:
    """Whether the model's loss drops each row's first label, as the Trainer decides it when it
    counts the label tokens of an accumulated batch."""
    return (LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
            and not getattr(model.config, "is_encoder_decoder", False))


def _aux_flag(model: nn.Module) -> bool:
    hook = installed_hook(model)
    return True if hook is None else hook.enabled


def register() -> None:
    """Make `from_pretrained` know `quant_method: "upcycle_fx"` and the refusal fusion name
    (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(UpcycleQuantizationConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(UpcycleHfQuantizer)
    _register_refusal_as_known_fusion()


def _register_refusal_as_known_fusion() -> None:
    """Versions that validate `fusion_config` before the quantizer sees the config then find
    REFUSAL known: a fusion family that matches no module, so it changes nothing.

    Every registered family is asked about every module, so an entry that does not answer the
    whole interface would break unrelated models: it is registered only where the interface is
    one this class answers in full (the methods below), and left out on any other version."""
    try:
        from transformers import fusion_mapping
    except ImportError:  # a version without fusion_config: nothing validates the name
        return
    registry = getattr(fusion_mapping, "_FUSION_REGISTRY", None)
    spec_class = getattr(fusion_mapping, "ModuleFusionSpec", None)
    if not isinstance(registry, dict) or spec_class is None or REFUSAL in registry:
        return

    class _FusesNothing(spec_class):
        def is_fusable(self, module: nn.Module) -> bool:
            return False

        def is_fused(self, module: nn.Module) -> bool:
            return False

        def make_fused_class(self, original_cls: type) -> type:
            return original_cls

        def make_transforms(self, *args: Any) -> list:
            return []

    answered = {"get_empty_log", "is_fusable", "is_fused", "make_fused_class", "make_transforms"}
    interface = {name for name, value in vars(spec_class).items()
                 if callable(value) and not name.startswith("_")}
    if interface <= answered:
        registry[REFUSAL] = _FusesNothing()


register()
