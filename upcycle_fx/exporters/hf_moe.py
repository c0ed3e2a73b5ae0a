"""Stock Hugging Face MoE checkpoints: Llama / Mistral / Qwen2 / Qwen3 -> Mixtral, Qwen2-MoE, Qwen3-MoE.

The output loads with `AutoModelForCausalLM.from_pretrained(dir)` (no remote code) and computes
the upcycled model's logits. Three things make that exact rather than approximate:

* Config: every field of the dense config is either carried over to a field of the target with
  the same meaning, known not to affect the function, or refused with `HFFormatError` naming it
  (biases the target lacks, per-layer sliding windows it cannot express, unknown fields). Rope
  parameters, tied embeddings, head_dim, norms' eps and sliding windows are copied exactly.
* Routing: the targets' routers take softmax over all experts, then top-k, then (Mixtral always,
  Qwen when `norm_topk_prob`) renormalise: `normalize_weights` must match; capacity limits and
  expert choice change inference and have no counterpart: refused. Training-only settings do
  not block shipping: the auxiliary loss weight becomes `router_aux_loss_coef`, a router z-loss
  (which the targets lack) is dropped with a warning. Qwen2-MoE always adds a
  gated shared expert: the layer's shared experts where it has them (with their sigmoid gate:
  shared experts without one are refused, since Qwen2-MoE's gate cannot be switched off), else
  one of zero width (`shared_expert_intermediate_size=0`), which adds exactly 0. Qwen3-MoE and
  Mixtral have no shared expert. Fine-grained experts set `moe_intermediate_size` (Mixtral, whose
  every layer is MoE: `intermediate_size`) to the experts' width. The router logits are computed in the model dtype there (float32 here): equal
  in float32, rounding-level differences in bf16 (which do not change the output while the
  experts are identical copies and weights are renormalised).
* Tensors: written under the names transformers itself writes (`save_pretrained`'s reverse weight
  conversion: per-expert `experts.{i}.gate_proj/w1...`), and the full set of names and shapes is
  checked against the target model built on the meta device before anything is written.
* Versions: config.json holds every field (not only those that differ from this transformers'
  defaults, which older versions do not share), plus the older spellings of renamed fields:
  `torch_dtype` beside `dtype`, `rope_theta` / `rope_scaling` beside `rope_parameters`, and the
  aliases of `attribute_map` (`num_experts` beside Qwen3-MoE's `num_local_experts`), so that
  transformers 4.57 computes the same logits (`benchmarks/hf_compat.py`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_map

from ..moe import MoE
from ..moe.options import softmax_top_k_problem
from ..report import moe_layers
from .errors import HFFormatError
from .hf_names import stored_tensors
from .pipeline import Unit, units_of
from .state import TensorTable, tensor_table

SOURCES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
           "qwen3": "Qwen3ForCausalLM"}
TARGETS = {"mixtral": ("MixtralConfig", "MixtralForCausalLM"),
           "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
           "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}
ACCEPTS = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2"), "qwen3_moe": ("qwen3",)}

# Fields every source and target share, with the same meaning: copied as they are.
COPIED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
          "rms_norm_eps", "use_cache", "tie_word_embeddings", "rope_parameters", "attention_dropout",
          "pad_token_id", "bos_token_id", "eos_token_id", "dtype", "id2label", "label2id",
          "output_attentions", "output_hidden_states", "return_dict", "problem_type",
          "chunk_size_feed_forward")
# Fields that describe the file, not the function: replaced by the target's own.
DROPPED = ("_name_or_path", "architectures", "model_type", "transformers_version", "is_encoder_decoder",
           "pretraining_tp",  # pretraining_tp: not read by transformers 5 modeling code
           "quantization_config", "fusion_config")  # upcycle_fx's from_pretrained record (hf_quantizer.py)
# Fields each source family has beyond COPIED, handled below (attention layout).
HANDLED = {"llama": ("head_dim", "attention_bias", "mlp_bias"), "mistral": ("head_dim", "sliding_window"),
           "qwen2": ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
           "qwen3": ("head_dim", "attention_bias", "use_sliding_window", "sliding_window",
                     "max_window_layers", "layer_types")}
_LAYER = re.compile(r"model\.layers\.(\d+)\.mlp")


class TrainingOnlySettingWarning(UserWarning):
    """A setting that only affects training was left out of a stock checkpoint."""


@dataclass(frozen=True)
class MoELayout:
    """What every MoE layer of the upcycled model shares (the targets have one global setting)."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    normalize: bool
    aux_loss_weight: float
    dtype: torch.dtype
    dropped: tuple[str, ...] = ()     # training-only settings the target cannot express
    expert_width: int = 0             # hidden units of one routed expert
    shared_width: int = 0             # hidden units of all shared experts together, 0 for none


@dataclass(frozen=True)
class Attention:
    """The attention facts a target must reproduce."""

    head_dim: int
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    windows: tuple[int | None, ...]   # sliding window of each layer, None for full attention


# --------------------------------------------------------------------------- facts


def _refuse(config, text: str) -> HFFormatError:
    return HFFormatError(f"{type(config).__name__} ({config.model_type}): {text}. Write the model with "
                         "format='native' (--format native) instead, which keeps everything.")


def moe_layout(model: nn.Module) -> MoELayout:
    """The MoE layers' shared shape and routing, or HFFormatError naming the layer that differs."""
    config = model.config
    layers = moe_layers(model)
    if not layers:
        raise _refuse(config, "the model has no MoE layer")
    first = layers[0][1]
    problems = []
    indices = []
    for path, moe in layers:
        match = _LAYER.fullmatch(path)
        if match is None:
            problems.append(f"{path} is not a decoder layer's mlp")
        else:
            indices.append(int(match.group(1)))
        problems += [f"{path}: {p}" for p in _layer_problems(moe, first, config)]
    if problems:
        raise _refuse(config, "; ".join(problems[:4]))
    s = first.settings
    return MoELayout(tuple(sorted(indices)), first.num_experts, s.top_k, s.normalize_weights,
                     float(s.aux_loss_weight), first.experts.up_proj.dtype, _training_only(layers),
                     first.experts.d_ff, _shared_width(first))


def _shared_width(moe: MoE) -> int:
    shared = getattr(moe, "shared", None)
    return 0 if shared is None else shared.d_ff


def _training_only(layers) -> tuple[str, ...]:
    """Notes on the training-only settings the target cannot carry (they do not change inference)."""
    notes = []
    z_loss = sorted({float(m.settings.z_loss_weight) for _, m in layers} - {0.0})
    if z_loss:
        notes.append(f"router z-loss weight {', '.join(map(str, z_loss))} (the stock MoE models have no z-loss)")
    aux = sorted({float(m.settings.aux_loss_weight) for _, m in layers})
    if len(aux) > 1:
        notes.append(f"per-layer auxiliary loss weights {aux} (router_aux_loss_coef is one number: "
                     f"{float(layers[0][1].settings.aux_loss_weight)}, the first layer's)")
    return tuple(notes)


def _layer_problems(moe: MoE, first: MoE, config) -> list[str]:
    e, s = moe.experts, moe.settings
    problems = []
    if not e.gated:
        problems.append("the FFN is not gated")
    if e.up_bias is not None or e.down_bias is not None:
        problems.append("the experts have biases, which the target's experts lack")
    if e.hidden_dropout:
        problems.append(f"hidden dropout {e.hidden_dropout} inside the experts has no counterpart")
    shared = getattr(moe, "shared", None)
    if shared is not None and shared.gate is None:
        problems.append("its shared experts have no sigmoid gate, which Qwen2-MoE's shared expert always "
                        "has (rewrite with shared_expert_gate=True)")
    if s.routing != "top_k":
        problems.append(f"routing {s.routing!r}: the target routes tokens with top-k only")
    if s.capacity_factor is not None:
        problems.append(f"capacity_factor {s.capacity_factor}: the target's routing is dropless")
    routing = softmax_top_k_problem(s)
    if routing is not None:
        problems.append(routing)
    same = (moe.num_experts, s.top_k, s.normalize_weights, e.d_ff, _shared_width(moe))
    if same != (first.num_experts, first.settings.top_k, first.settings.normalize_weights,
                first.experts.d_ff, _shared_width(first)):
        problems.append(f"(experts, top_k, normalize, expert width, shared width) {same} differ from the "
                        "first MoE layer's")
    return problems


def attention_of(config) -> Attention:
    """Head size, biases, q/k norms and per-layer sliding windows of a supported dense config."""
    kind = config.model_type
    n = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if kind == "mistral":
        windows = (config.sliding_window,) * n
    elif kind in ("qwen2", "qwen3"):
        windows = tuple(config.sliding_window if t == "sliding_attention" else None for t in config.layer_types)
    else:
        windows = (None,) * n
    bias = bool(getattr(config, "attention_bias", False))
    return Attention(head_dim, qkv_bias=bias or kind == "qwen2", o_bias=bias, qk_norm=kind == "qwen3",
                     windows=windows)


def choose_target(config, layout: MoELayout, requested: str = "auto") -> str:
    """The stock architecture for this input: requested, or Qwen3-MoE for Qwen3, Mixtral when every
    layer of a Llama/Mistral is MoE, Qwen2-MoE otherwise."""
    kind = config.model_type
    if requested == "auto":
        every_layer = len(layout.layers) == config.num_hidden_layers
        requested = "qwen3_moe" if kind == "qwen3" else (
            "mixtral" if every_layer and kind in ACCEPTS["mixtral"] and not layout.shared_width else "qwen2_moe")
    if requested not in TARGETS:
        raise HFFormatError(f"hf_target={requested!r} is unknown; use auto, {', '.join(TARGETS)}.")
    if layout.shared_width and requested != "qwen2_moe":
        raise _refuse(config, f"the MoE layers have shared experts, which {TARGETS[requested][1]} lacks "
                              "(Qwen2-MoE has them, from Llama, Mistral and Qwen2 models)")
    if kind not in ACCEPTS[requested]:
        raise _refuse(config, f"{requested} can only be written from {'/'.join(ACCEPTS[requested])} "
                              f"models (its attention differs from {kind}'s)")
    return requested


# --------------------------------------------------------------------------- the config


def target_config(config, layout: MoELayout, target: str):
    """The target's config, carrying every field of `config` exactly (or refusing); its dtype
    is that of the experts (the stored weights)."""
    import transformers

    _check_fields(config)
    attention = attention_of(config)
    values: dict[str, Any] = {k: getattr(config, k) for k in COPIED if hasattr(config, k)}
    values.update(dtype=layout.dtype, num_experts_per_tok=layout.top_k,
                  router_aux_loss_coef=layout.aux_loss_weight, output_router_logits=False,
                  head_dim=attention.head_dim)
    if getattr(config, "mlp_bias", False):
        raise _refuse(config, "mlp_bias=True: the target's dense and expert MLPs have no biases")
    values.update(_attention_fields(config, attention, target))
    values.update(_sparsity_fields(config, layout, target))
    config_class, model_class = TARGETS[target]
    out = getattr(transformers, config_class)(**values)
    out.architectures = [model_class]
    return out


def _check_fields(config) -> None:
    known = set(COPIED) | set(DROPPED) | set(HANDLED[config.model_type])
    unknown = sorted(k for k in config.to_dict() if k not in known)
    if unknown:
        raise _refuse(config, f"config field(s) {', '.join(unknown)} have no known counterpart in the "
                              "stock MoE configs, so they cannot be carried over exactly")


def _attention_fields(config, attention: Attention, target: str) -> dict[str, Any]:
    windows = set(attention.windows)
    if attention.qk_norm != (target == "qwen3_moe"):
        raise _refuse(config, f"{target}'s attention {'has' if target == 'qwen3_moe' else 'lacks'} q/k norms")
    if target == "mixtral":
        if attention.qkv_bias or attention.o_bias:
            raise _refuse(config, "attention biases: Mixtral's q/k/v/o projections have none")
        if len(windows) > 1:
            raise _refuse(config, "sliding window on some layers only: Mixtral has one window for all")
        return {"sliding_window": attention.windows[0], "router_jitter_noise": 0.0}
    if target == "qwen2_moe":
        if attention.o_bias:
            raise _refuse(config, "attention_bias=True puts a bias on o_proj, which Qwen2-MoE lacks "
                                  "(it has q/k/v biases only)")
        sizes = windows - {None}
        if len(sizes) > 1:
            raise _refuse(config, f"several sliding window sizes {sorted(sizes)}: Qwen2-MoE has one")
        return {"qkv_bias": attention.qkv_bias, "use_sliding_window": bool(sizes),
                "sliding_window": next(iter(sizes)) if sizes else None,
                "max_window_layers": config.num_hidden_layers,
                "layer_types": ["sliding_attention" if w else "full_attention" for w in attention.windows]}
    if len(windows) > 1:
        raise _refuse(config, "sliding window on some layers only: Qwen3-MoE has one window for all layers")
    window = attention.windows[0]
    return {"attention_bias": attention.o_bias, "use_sliding_window": window is not None,
            "sliding_window": window}


def _sparsity_fields(config, layout: MoELayout, target: str) -> dict[str, Any]:
    n = config.num_hidden_layers
    if target == "mixtral":
        if len(layout.layers) != n:
            raise _refuse(config, f"Mixtral has an MoE in every layer, but only layers {list(layout.layers)} "
                                  "were converted; use pattern='all', or hf_target='qwen2_moe'")
        if not layout.normalize:
            raise _refuse(config, "normalize_weights=False: Mixtral always renormalises the top-k weights")
        return {"num_local_experts": layout.num_experts, "intermediate_size": layout.expert_width}
    every_other = tuple(i for i in range(n) if (i + 1) % 2 == 0)
    step, dense = (2, []) if layout.layers == every_other else (
        1, [i for i in range(n) if i not in layout.layers])
    fields = {"num_experts": layout.num_experts, "moe_intermediate_size": layout.expert_width,
              "norm_topk_prob": layout.normalize, "decoder_sparse_step": step, "mlp_only_layers": dense}
    if target == "qwen2_moe":
        fields["shared_expert_intermediate_size"] = layout.shared_width  # 0: no shared expert, adds exactly 0
    return fields


# --------------------------------------------------------------------------- the output format


class HFFormat:
    """Output format writing the upcycled model as a stock transformers MoE checkpoint."""

    def __init__(self, model: nn.Module, table: TensorTable, *, target: str = "auto",
                 reference: nn.Module | None = None, generation_config=None,
                 dtype: torch.dtype | None = None) -> None:
        config = getattr(model, "config", None)
        if config is None or not type(model).__module__.startswith("transformers."):
            raise HFFormatError(f"{type(model).__name__} is not a transformers model; only Llama, Mistral, "
                                "Qwen2 and Qwen3 causal LMs have stock MoE formats. Use format='native'.")
        if config.model_type not in SOURCES:
            raise _refuse(config, f"transformers has no stock MoE counterpart that upcycle_fx writes for "
                                  f"{config.model_type!r}; supported inputs: {', '.join(SOURCES.values())}")
        if type(model).__name__ != SOURCES[config.model_type]:
            raise _refuse(config, f"{type(model).__name__} is not a causal LM; only "
                                  f"{SOURCES[config.model_type]} maps to a stock MoE causal LM")
        self.layout = moe_layout(model)
        if dtype is not None:
            self.layout = dataclasses.replace(self.layout, dtype=dtype)
        self.target = choose_target(config, self.layout, target)
        for note in self.layout.dropped:
            warnings.warn(f"{TARGETS[self.target][1]} output: {note} is training-only and not written; "
                          "inference is unaffected (format='native' keeps it).", TrainingOnlySettingWarning,
                          stacklevel=3)
        self.config = target_config(config, self.layout, self.target)
        import transformers

        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # the 0-wide shared expert
            self.target_model = getattr(transformers, TARGETS[self.target][1])(self.config)
        self.reference = reference
        self.generation_config = generation_config
        self._check_names(model, table)

    def _runtime(self, unit: Unit, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unit under the target model's own parameter names."""
        if unit.non_persistent:
            return {}
        if unit.moe is None:
            return dict(tensors)
        host = unit.moe
        renames = {f"{host}.router.weight": f"{host}.gate.weight",
                   f"{host}.experts.up_proj": f"{host}.experts.gate_up_proj",
                   f"{host}.experts.down_proj": f"{host}.experts.down_proj",
                   f"{host}.shared.gate.weight": f"{host}.shared_expert_gate.weight"}
        shared = {f"{host}.shared.experts.up_proj", f"{host}.shared.experts.down_proj"}
        unknown = sorted(set(tensors) - set(renames) - shared)
        if unknown:
            raise _refuse(self.config, f"{host} holds tensors the target's MoE block lacks: {unknown[:3]}")
        out = {renames[name]: t for name, t in tensors.items() if name in renames}
        if f"{host}.shared.experts.up_proj" in tensors:  # one expert [1, 2w, D] / [1, D, w] -> Qwen2MoeMLP
            gate, up = tensors[f"{host}.shared.experts.up_proj"][0].chunk(2)
            out.update({f"{host}.shared_expert.gate_proj.weight": gate,
                        f"{host}.shared_expert.up_proj.weight": up,
                        f"{host}.shared_expert.down_proj.weight": tensors[f"{host}.shared.experts.down_proj"][0]})
        elif self.target == "qwen2_moe":
            like = out[f"{host}.experts.down_proj"]
            d, factory = like.shape[1], {"dtype": like.dtype, "device": like.device}
            out.update({f"{host}.shared_expert.gate_proj.weight": torch.zeros(0, d, **factory),
                        f"{host}.shared_expert.up_proj.weight": torch.zeros(0, d, **factory),
                        f"{host}.shared_expert.down_proj.weight": torch.zeros(d, 0, **factory),
                        f"{host}.shared_expert_gate.weight": torch.zeros(1, d, **factory)})
        return out

    def _check_names(self, model: nn.Module, table: TensorTable) -> None:
        """Our tensors, renamed, must be exactly the target model's (names and shapes)."""
        ours: dict[str, tuple[int, ...]] = {}
        for unit in units_of(model, table):
            meta = {n: torch.empty_like(table.tensors[n], device="meta") for n in unit.names}
            ours.update({k: tuple(v.shape) for k, v in self._runtime(unit, meta).items()})
        target = tensor_table(self.target_model)
        skip = set(target.non_persistent)
        theirs = {n: tuple(t.shape) for n, t in target.tensors.items() if n not in skip}
        if ours != theirs:
            missing = sorted(set(theirs) - set(ours))[:4]
            extra = sorted(set(ours) - set(theirs))[:4]
            shapes = [f"{n} {ours[n]} vs {theirs[n]}" for n in ours if n in theirs and ours[n] != theirs[n]][:4]
            raise _refuse(self.config, f"the weights do not fit {TARGETS[self.target][1]} (missing {missing}, "
                                       f"extra {extra}, other shape {shapes}); tied embeddings or biases differ")

    def convert(self, unit: Unit, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        runtime = self._runtime(unit, tensors)
        if not runtime:
            return {}
        return {name: t.contiguous() for name, t in stored_tensors(self.target_model, runtime).items()}

    def write_files(self, directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps(config_json(self.config), indent=2, sort_keys=True) + "\n")
        if self.generation_config is not None:
            self.generation_config.save_pretrained(directory)

    def check(self, directory: Path) -> None:
        """Load the written checkpoint with transformers and compare its logits with the model's."""
        if self.reference is not None:
            verify_hf_checkpoint(directory, self.reference)


def config_json(config) -> dict[str, Any]:
    """Every field of the target config (defaults included: other transformers versions have
    other defaults, e.g. Mixtral's rope_theta), with the older spellings of renamed fields."""
    values = config.to_dict()
    values.setdefault("torch_dtype", values.get("dtype"))
    rope = values.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and not isinstance(rope.get("rope_theta"), dict):
        values.setdefault("rope_theta", rope["rope_theta"])
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        values.setdefault("rope_scaling", None if scaling.get("rope_type", "default") == "default" else scaling)
    for alias, field in type(config).attribute_map.items():
        if field in values:
            values.setdefault(alias, values[field])
    return values


def verify_hf_checkpoint(directory: Path, reference: nn.Module, *, device: torch.device | str | None = None) -> float:
    """Relative logits error of `AutoModelForCausalLM.from_pretrained(directory)` against `reference`
    on the model's example inputs; HFFormatError beyond the dtype's tolerance (1e-5 in float32).
    The reference runs where it is; the loaded model on `device` (default: the reference's
    device), with the same inputs moved there; the logits are compared on the CPU."""
    from transformers import AutoModelForCausalLM

    from ..capture.inputs import resolve_inputs
    from ..passes.verify import TOLERANCE
    from ..report import first_tensor, relative_error

    home = next(iter(reference.parameters()), torch.empty(0)).device
    device = home if device is None else torch.device(device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # the 0-wide shared expert
        loaded = AutoModelForCausalLM.from_pretrained(directory, dtype="auto", local_files_only=True)
    loaded = loaded.to(device).eval()
    inputs = resolve_inputs(reference)
    moved = type(inputs)(*tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x,
                                   (inputs.args, inputs.kwargs)))
    saved = [(m, m.training, m.last_aux_loss, m.last_expert_load, m.last_dropped)
             for _, m in moe_layers(reference)]
    modes = [(m, m.training) for m in reference.modules()]
    try:
        reference.eval()
        with torch.no_grad():
            expected = first_tensor(inputs.call(reference)).cpu()
            actual = first_tensor(moved.call(loaded)).cpu()
    finally:
        for module, training in modes:
            module.training = training
        for moe, _, aux, load, dropped in saved:
            moe.last_aux_loss, moe.last_expert_load, moe.last_dropped = aux, load, dropped
    error = relative_error(actual, expected)
    tolerance = max(1e-5 if t.dtype == torch.float32 else TOLERANCE.get(t.dtype, 1e-4) for t in (expected, actual))
    if not error <= tolerance:
        raise HFFormatError(f"{directory}: the written {type(loaded).__name__} gives logits {error:.2e} "
                            f"(relative) away from the upcycled model's (tolerance {tolerance:.0e}); it was "
                            "not moved into place. Please report this with the model's config.")
    return error
