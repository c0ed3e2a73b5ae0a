"""`upcycle_fx.json`: what a native checkpoint holds besides tensors, and rebuilding the model.

The manifest records which FFNs became MoE layers (module path, FFN index, shapes, activation,
routing settings), which modules were folded into them or spliced, tied tensors, the dense
model's class and (for Hugging Face models) its config, and the versions that wrote it. Loading
does not unpickle code: it re-runs the rewrite on the dense skeleton with the recorded FFN
indices, checks that the same MoE layers come out, and only then puts the weights in.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import UpcycleConfig
from ..errors import UpcycleError
from ..moe import MoE, MoESettings, Router
from ..moe.dispatch import IMPLEMENTATIONS
from ..moe.experts import Experts
from ..passes import FoldedIntoMoE
from ..passes.splice import is_spliced
from ..report import moe_layers
from .errors import CheckpointMismatchError, ManifestError, NotACheckpointError
from .state import TensorTable

FILENAME = "upcycle_fx.json"
FORMAT = "upcycle_fx.native"
FORMAT_VERSION = 1


@dataclass
class MoERecord:
    """One MoE layer of the saved model."""

    path: str
    mlp_index: int
    source: str
    num_experts: int
    d_model: int
    d_ff: int
    gated: bool
    activation: str
    up_bias: bool
    down_bias: bool
    hidden_dropout: float
    dispatch_impl: str
    settings: dict[str, Any]

    @classmethod
    def of(cls, path: str, moe: MoE) -> "MoERecord":
        e = moe.experts
        return cls(path, moe.mlp_index, moe.source, e.num_experts, e.d_model, e.d_ff, e.gated,
                   e.activation_name, e.up_bias is not None, e.down_bias is not None,
                   e.hidden_dropout, moe.dispatch_impl, asdict(moe.settings))


@dataclass
class Manifest:
    """Everything but the tensors; JSON-serialisable."""

    model_class: str
    moe_layers: list[MoERecord]
    folded: dict[str, str] = field(default_factory=dict)       # folded module path -> MoE path
    spliced: list[str] = field(default_factory=list)           # blocks whose forward runs a re-traced graph
    aliases: dict[str, str] = field(default_factory=dict)      # tied tensor name -> stored name
    non_persistent: list[str] = field(default_factory=list)    # stored buffers outside state_dict()
    training: bool = False                                     # the root module's mode
    other_mode: list[str] = field(default_factory=list)        # modules in the other mode
    hf_config: dict[str, Any] | None = None                   # dense config of a transformers model
    attn_implementation: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        """The manifest in `text`, checked level by level against this class (JSON types, keys,
        known values) before anything is built: a ManifestError names the first problem."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as error:
            raise ManifestError(f"{where}: not valid JSON ({error}); the checkpoint is damaged.") from error
        if not isinstance(data, dict):
            raise ManifestError(f"{where}: the top level is {_json_type(data)}, not an object; this file was "
                                "not written by upcycle_fx.save, or is damaged: save the model again.")
        if data.get("format") != FORMAT:
            found = f"format {data['format']!r}" if "format" in data else "no \"format\" key"
            raise ManifestError(f"{where}: {found}, not {FORMAT!r}; this file was not written by "
                                "upcycle_fx.save, or is damaged: save the model again.")
        version = data.get("format_version", FORMAT_VERSION)
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            recorded = data.get("versions")
            written_by = recorded.get("upcycle_fx") if isinstance(recorded, dict) else None
            raise ManifestError(f"{where}: written by upcycle_fx {written_by or 'a newer version'} in format "
                                f"version {version}; this upcycle_fx reads up to {FORMAT_VERSION}. "
                                "Upgrade upcycle_fx to load it.")
        try:
            manifest = _record(cls, data, "")
            _check_values(manifest)
        except _Invalid as error:
            raise ManifestError(f"{where}: {str(error).rstrip('.')}. The file is damaged or was not written by this "
                                "upcycle_fx; restore it, or save the model again.") from None
        return manifest


# --------------------------------------------------------------------------- validation


class _Invalid(Exception):
    """A value of the manifest that does not fit its schema (the message names where)."""


def _json_type(value: Any) -> str:
    kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "a list", dict: "an object"}
    text = json.dumps(value) if not isinstance(value, (list, dict)) else ""
    return kinds.get(type(value), type(value).__name__) + (f" ({text[:40]})" if text else "")


def _expected(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _expected(a) for a in typing.get_args(hint))
    if origin is list or origin is dict:
        return {list: "a list", dict: "an object"}[origin]
    return names.get(hint, "an object" if is_dataclass(hint) else str(hint))


def _conform(value: Any, hint: Any, where: str) -> Any:
    """`value` (parsed JSON) as the annotated type `hint`; _Invalid naming `where` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _conform(value, hint, where)
    if is_dataclass(hint):
        return _record(hint, value, where)
    if origin is list and isinstance(value, list):
        return [_conform(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict and isinstance(value, dict):
        return {key: _conform(item, args[1], f"{where}[{key!r}]") for key, item in value.items()}
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and type(value) is hint:
        return value
    raise _Invalid(f"{where} is {_json_type(value)}; expected {_expected(hint)}")


def _record(cls: type, data: Any, where: str) -> Any:
    """An instance of the dataclass `cls` from a JSON object: every key known, every required
    key present, every value of its annotated type."""
    label = where or "the top level"
    if not isinstance(data, dict):
        raise _Invalid(f"{label} is {_json_type(data)}; expected an object")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise _Invalid(f"{label} has unknown key(s) {unknown} (known: {sorted(known)}; a newer upcycle_fx "
                       "may have written it)")
    missing = [name for name, f in known.items()
               if name not in data and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise _Invalid(f"{label} lacks the key(s) {missing}")
    prefix = f"{where}." if where else ""
    return cls(**{key: _conform(value, hints[key], prefix + key) for key, value in data.items()})


def _check_values(manifest: "Manifest") -> None:
    """Values the types allow but this version cannot mean (unknown names, out of range)."""
    if manifest.format_version < 1:
        raise _Invalid(f"format_version={manifest.format_version} must be >= 1")
    if "." not in manifest.model_class:
        raise _Invalid(f"model_class {manifest.model_class!r} is not a qualified class name (module.Class)")
    seen_paths, seen_indices = set(), set()
    for i, record in enumerate(manifest.moe_layers):
        where = f"moe_layers[{i}] ({record.path})"
        record.settings = asdict(_record(MoESettings, record.settings, f"moe_layers[{i}].settings"))
        if record.dispatch_impl not in IMPLEMENTATIONS:
            raise _Invalid(f"{where}: dispatch_impl {record.dispatch_impl!r} is unknown; this upcycle_fx "
                           f"has {IMPLEMENTATIONS}")
        for name in ("num_experts", "d_model", "d_ff"):
            if getattr(record, name) < 1:
                raise _Invalid(f"{where}: {name}={getattr(record, name)} must be >= 1")
        if record.mlp_index < 0:
            raise _Invalid(f"{where}: mlp_index={record.mlp_index} must be >= 0")
        if not 0.0 <= record.hidden_dropout < 1.0:
            raise _Invalid(f"{where}: hidden_dropout={record.hidden_dropout} must be in [0, 1)")
        if record.path in seen_paths or record.mlp_index in seen_indices:
            raise _Invalid(f"{where}: a second MoE layer at the same path or FFN index")
        seen_paths.add(record.path)
        seen_indices.add(record.mlp_index)
        shared = {k: v for k, v in record.settings.items() if k in {f.name for f in fields(UpcycleConfig)}}
        try:
            UpcycleConfig(num_experts=record.num_experts, **shared)
        except UpcycleError as error:
            raise _Invalid(f"{where}: settings {error}") from None


def versions() -> dict[str, str]:
    """Versions of the libraries that define the checkpoint's meaning."""
    import safetensors
    import torch

    from .. import __version__

    found = {"upcycle_fx": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}
    try:  # from the installed metadata: saving a plain torch model need not import transformers
        found["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - plain-torch installs
        pass
    return found


def qualified_class(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def describe(model: nn.Module, table: TensorTable) -> Manifest:
    """The manifest of an upcycled model (real or on the meta device)."""
    folded = {path: m.moe_path for path, m in model.named_modules() if isinstance(m, FoldedIntoMoE)}
    spliced = [path for path, m in model.named_modules()
               if is_spliced(m) and any(isinstance(c, MoE) for c in m.children())]
    config = getattr(model, "config", None)
    hf = config is not None and hasattr(config, "to_dict") and type(model).__module__.startswith("transformers.")
    return Manifest(
        model_class=qualified_class(model),
        moe_layers=[MoERecord.of(path, moe) for path, moe in moe_layers(model)],
        folded=folded, spliced=spliced, aliases=dict(table.aliases),
        non_persistent=list(table.non_persistent), training=model.training,
        other_mode=[path for path, m in model.named_modules() if m.training != model.training],
        hf_config=config.to_dict() if hf else None,
        attn_implementation=getattr(config, "_attn_implementation", None) if hf else None,
        versions=versions())


def write_manifest(manifest: Manifest, directory: Path) -> None:
    (directory / FILENAME).write_text(manifest.to_json())


def read_manifest(directory: Path) -> Manifest:
    path = directory / FILENAME
    if not path.is_file():
        hint = (" It looks like a Hugging Face checkpoint: load it with transformers "
                "(AutoModelForCausalLM.from_pretrained)." if (directory / "config.json").is_file() else "")
        found = sorted(p.name for p in directory.iterdir())
        listing = f" It holds {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}." if not hint else ""
        raise NotACheckpointError(f"{directory}: no {FILENAME}, so this is not an upcycle_fx checkpoint.{hint}"
                                  f"{listing} upcycle_fx.load reads directories written by upcycle_fx.save; "
                                  "upcycle a Hugging Face model with upcycle_fx.convert_checkpoint(dir, out).")
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: cannot be read as text ({error}); the checkpoint is damaged.") from error
    return Manifest.from_json(text, str(path))


# --------------------------------------------------------------------------- rebuilding


def rebuild(manifest: Manifest, skeleton: nn.Module, *, example_inputs: Any = None,
            leaf_modules=(), inplace: bool = False, where: str = "") -> nn.Module:
    """Rewrite the dense `skeleton` as the manifest says; raise CheckpointMismatchError if it
    does not give the saved model's MoE layers (`where`: the checkpoint, for the message).
    Weights are not touched (they are loaded next)."""
    prefix = f"{where}: " if where else ""
    records = manifest.moe_layers
    if not records:
        return skeleton if inplace else copy.deepcopy(skeleton)
    first = records[0]
    shared = {k: v for k, v in first.settings.items() if k in {f.name for f in fields(UpcycleConfig)}}
    shared["routing"] = {r.mlp_index: r.settings["routing"] for r in records}  # each layer's own
    config = UpcycleConfig(pattern=sorted(r.mlp_index for r in records), num_experts=first.num_experts,
                           seed=0, **shared)  # seed: leave the caller's global RNG alone
    try:
        from ..api import upcycle

        model = upcycle(skeleton, config, example_inputs=example_inputs, inplace=inplace,
                        leaf_modules=leaf_modules, verify=False).model
    except UpcycleError as error:
        raise CheckpointMismatchError(
            f"{prefix}{type(skeleton).__name__}: the skeleton could not be rewritten as the saved model was "
            f"({type(error).__name__}: {error}). Pass the dense model the checkpoint was made from.") from error
    except Exception as error:  # the skeleton's own forward (run to capture it) failed
        raise CheckpointMismatchError(
            f"{prefix}{type(skeleton).__name__}: running the skeleton to rewrite it failed ({type(error).__name__}: "
            f"{error}). Pass the dense model the checkpoint was made from (with example_inputs if it needs "
            "them); for a Hugging Face model, the recorded hf_config may be damaged.") from error
    found = dict(moe_layers(model))
    problems = [f"no MoE at {r.path} (FFN #{r.mlp_index})" for r in records if r.path not in found]
    problems += [f"an MoE at {path} that the checkpoint does not have" for path in found
                 if path not in {r.path for r in records}]
    for record in records:
        if record.path in found:
            problems += _restore_layer(found[record.path], record)
    problems += [f"{path} is not folded into {moe_path}" for path, moe_path in manifest.folded.items()
                 if not isinstance(_submodule(model, path), FoldedIntoMoE)]
    problems += [f"{path} is not a spliced graph" for path in manifest.spliced
                 if not is_spliced(_submodule(model, path))]
    if problems:
        raise CheckpointMismatchError(
            f"{prefix}{type(skeleton).__name__}: rewriting the skeleton does not give the saved model: "
            + "; ".join(problems[:6]) + ". Pass the dense model the checkpoint was made from.")
    model.train(manifest.training)
    for path in manifest.other_mode:
        module = _submodule(model, path)
        if module is not None:
            module.training = not manifest.training
    return model


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _restore_layer(moe: MoE, record: MoERecord) -> list[str]:
    """Check the rebuilt layer's shape against the record and set what the rewrite cannot know."""
    e = moe.experts
    got = (e.d_model, e.d_ff, e.gated, e.activation_name, e.up_bias is not None, e.down_bias is not None)
    want = (record.d_model, record.d_ff, record.gated, record.activation, record.up_bias, record.down_bias)
    if got != want:
        return [f"{record.path} has (d_model, d_ff, gated, activation, biases) {got}, saved {want}"]
    if e.num_experts != record.num_experts:  # a layer whose expert count was changed after the rewrite
        moe.experts = Experts(record.num_experts, e.d_model, e.d_ff, gated=e.gated, activation=e.activation,
                              activation_name=e.activation_name, up_bias=record.up_bias,
                              down_bias=record.down_bias, up_bias_half=e.up_bias_half, device="meta")
        moe.router = Router(e.d_model, record.num_experts, device="meta", generator=torch.Generator())
    moe.experts.hidden_dropout = record.hidden_dropout
    moe.settings = MoESettings(**record.settings)
    moe.dispatch_impl, moe.source = record.dispatch_impl, record.source
    return []
