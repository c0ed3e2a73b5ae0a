"""`upcycle_fx.json`: what a native checkpoint holds besides tensors, and rebuilding the model.

The manifest records which FFNs became MoE layers (module path, FFN index, shapes, activation,
routing settings), which modules were folded into them or spliced, tied tensors, the dense
model's class and (for Hugging Face models) its config, and the versions that wrote it. Loading
does not unpickle code: it re-runs the rewrite on the dense skeleton with the recorded FFN
indices, checks that the same MoE layers come out, and only then puts the weights in.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..config import UpcycleConfig
from ..errors import UpcycleError
from ..moe import MoE, MoESettings, Router
from ..moe.experts import Experts
from ..passes import FoldedIntoMoE
from ..report import moe_layers
from .errors import CheckpointError, CheckpointMismatchError
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
    spliced: list[str] = field(default_factory=list)           # modules re-traced as GraphModules
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
        try:
            data = json.loads(text)
        except ValueError as error:
            raise CheckpointError(f"{where}: not valid JSON ({error}); the checkpoint is damaged.") from error
        if data.get("format") != FORMAT:
            raise CheckpointError(f"{where}: format {data.get('format')!r} is not {FORMAT!r}.")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            written_by = data.get("versions", {}).get("upcycle_fx", "a newer version")
            raise CheckpointError(f"{where}: written by upcycle_fx {written_by} in format version "
                                  f"{data['format_version']}; this upcycle_fx reads up to "
                                  f"{FORMAT_VERSION}. Upgrade upcycle_fx to load it.")
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["moe_layers"] = [MoERecord(**record) for record in data.get("moe_layers", [])]
        return cls(**data)


def versions() -> dict[str, str]:
    """Versions of the libraries that define the checkpoint's meaning."""
    import safetensors
    import torch

    from .. import __version__

    found = {"upcycle_fx": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__}
    try:
        import transformers

        found["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - plain-torch installs
        pass
    return found


def qualified_class(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def describe(model: nn.Module, table: TensorTable) -> Manifest:
    """The manifest of an upcycled model (real or on the meta device)."""
    folded = {path: m.moe_path for path, m in model.named_modules() if isinstance(m, FoldedIntoMoE)}
    spliced = [path for path, m in model.named_modules()
               if isinstance(m, fx.GraphModule) and any(isinstance(c, MoE) for c in m.children())]
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
        raise CheckpointError(f"{directory}: no {FILENAME}, so this is not an upcycle_fx checkpoint.{hint}")
    return Manifest.from_json(path.read_text(), str(path))


# --------------------------------------------------------------------------- rebuilding


def rebuild(manifest: Manifest, skeleton: nn.Module, *, example_inputs: Any = None,
            leaf_modules=(), inplace: bool = False) -> nn.Module:
    """Rewrite the dense `skeleton` as the manifest says; raise CheckpointMismatchError if it
    does not give the saved model's MoE layers. Weights are not touched (they are loaded next)."""
    records = manifest.moe_layers
    if not records:
        return skeleton if inplace else copy.deepcopy(skeleton)
    first = records[0]
    shared = {k: v for k, v in first.settings.items() if k in {f.name for f in fields(UpcycleConfig)}}
    config = UpcycleConfig(pattern=sorted(r.mlp_index for r in records), num_experts=first.num_experts,
                           seed=0, **shared)  # seed: leave the caller's global RNG alone
    try:
        from ..api import upcycle

        model = upcycle(skeleton, config, example_inputs=example_inputs, inplace=inplace,
                        leaf_modules=leaf_modules, verify=False).model
    except UpcycleError as error:
        raise CheckpointMismatchError(
            f"{type(skeleton).__name__}: the skeleton could not be rewritten as the saved model was "
            f"({type(error).__name__}: {error}). Pass the dense model the checkpoint was made from.") from error
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
                 if not isinstance(_submodule(model, path), fx.GraphModule)]
    if problems:
        raise CheckpointMismatchError(
            f"{type(skeleton).__name__}: rewriting the skeleton does not give the saved model: "
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
                              down_bias=record.down_bias, device="meta")
        moe.router = Router(e.d_model, record.num_experts, device="meta", generator=torch.Generator())
    unknown = set(record.settings) - {f.name for f in fields(MoESettings)}
    if unknown:
        return [f"{record.path} has routing settings {sorted(unknown)} this upcycle_fx does not know "
                "(saved by a newer version?)"]
    moe.experts.hidden_dropout = record.hidden_dropout
    moe.settings = MoESettings(**record.settings)
    moe.dispatch_impl, moe.source = record.dispatch_impl, record.source
    return []
