"""Native checkpoints: `upcycle_fx.save(model, dir)` and `upcycle_fx.load(dir, skeleton)`.

A native checkpoint is safetensors weights (every parameter and buffer, tied ones once) plus
`upcycle_fx.json` (see `manifest.py`). It round-trips any upcycled model bit for bit: a Hugging
Face model comes back from its recorded config alone (built on the meta device, so nothing is
initialised twice), any other model from its dense skeleton (the model before the rewrite,
built by your own code; its weights are not used).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..integrations import QUANT_METHOD
from .atomic import interrupted_replacement, leftovers
from .errors import CheckpointError, InterruptedReplaceError, ManifestError, NotACheckpointError
from .manifest import Manifest, describe, read_manifest, rebuild, write_manifest
from .pipeline import ModelSource, Unit, output_dtype, units_of, write_checkpoint
from .shards import CheckpointReader, Progress, parse_size
from .state import TensorTable, assign_state, check_stored, storable, tensor_table

DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes, as transformers' "5GB"


class NativeFormat:
    """Stores the upcycled model's tensors under their own names, with the manifest."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest

    def convert(self, unit: Unit, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return storable(tensors)

    def write_files(self, directory: Path) -> None:
        write_manifest(self.manifest, directory)
        self._write_hf_config(directory)

    def _write_hf_config(self, directory: Path) -> None:
        """The `config.json` that `save_pretrained` writes, for an upcycled transformers model: its
        tensors are stored under the names transformers uses, so `from_pretrained(directory)`
        loads the native checkpoint too (and refuses without upcycle_fx, as for save_pretrained)."""
        config = self.manifest.hf_config
        quantization = (config or {}).get("quantization_config") or {}
        if quantization.get("quant_method") != QUANT_METHOD:
            return
        config = {**config, "architectures": [self.manifest.model_class.rpartition(".")[2]]}
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def check(self, directory: Path) -> None:
        pass


def save(model: nn.Module, directory: str | os.PathLike, *, format: str = "native",
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
         progress: Progress | None = None, hf_target: str = "auto", verify: bool = True,
         dtype: torch.dtype | str | None = None) -> Path:
    """Write an upcycled `model` to `directory` (created; an existing model there is an
    `OutputExistsError` unless `overwrite`).

    format="native": safetensors + `upcycle_fx.json`, read back by `upcycle_fx.load`.
    format="hf": a stock transformers MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE; see
    `hf_moe.py`) that `AutoModelForCausalLM.from_pretrained(directory)` loads, its config's
    dtype that of the stored weights; with `verify` it is loaded back (on the model's device)
    and its logits compared before the directory appears.
    dtype: store floating tensors in this dtype (e.g. "bfloat16"); None keeps the model's.
    The model is only read; it may be on any device.
    """
    _check_arguments("save", model=model, directory=directory, format=format, overwrite=overwrite,
                     verify=verify, hf_target=hf_target)
    if progress is not None and not all(callable(getattr(progress, m, None)) for m in ("start", "tensor", "shard")):
        raise CheckpointError(f"upcycle_fx.save: progress={progress!r} must be None or an object with "
                              "start(tensors, shards, nbytes), tensor(name, nbytes) and shard(filename) "
                              "methods (exporters.shards.Progress).")
    max_bytes = parse_size(max_shard_size)
    cast = output_dtype(dtype)
    table = tensor_table(model)
    _refuse_meta(table)
    units = units_of(model, table)
    if format == "native":
        fmt = NativeFormat(describe(model, table))
    elif format == "hf":
        from .hf_moe import HFFormat

        fmt = HFFormat(model, table, target=hf_target, reference=model if verify else None,
                       generation_config=getattr(model, "generation_config", None), dtype=cast)
    else:
        raise CheckpointError(f"format={format!r} is unknown; use 'native' or 'hf'.")
    return write_checkpoint(directory, units, ModelSource(table, cast), fmt, max_shard_bytes=max_bytes,
                            overwrite=overwrite, progress=progress).path


def _refuse_meta(table: TensorTable) -> None:
    meta = [name for name, t in table.tensors.items() if t.device.type == "meta"]
    if meta:
        raise CheckpointError(f"{len(meta)} tensor(s) have no data (meta device), e.g. {meta[0]}; "
                              "load or initialise the model's weights before saving it.")


def load(directory: str | os.PathLike, skeleton: nn.Module | None = None, *,
         example_inputs: Any = None, leaf_modules=()) -> nn.Module:
    """The model saved in `directory` by `upcycle_fx.save`, bit-identical to it.

    `skeleton`: the dense model the checkpoint was converted from (its class and structure
    matter, its weights are ignored and it is not modified). Not needed for Hugging Face models:
    they are rebuilt from the recorded config. `example_inputs` / `leaf_modules`: as given to
    `rewrite` when the model needed them to be captured.

    Every level is checked before any tensor data is read: first, before the model is built, the
    manifest's structure, types and values (ManifestError), the index and shard headers
    (ManifestError, MissingShardError, TruncatedShardError); then names, shapes and dtypes
    against the rebuilt model (CheckpointMismatchError, CheckpointDtypeError). A path that is not a native
    checkpoint is a NotACheckpointError; a model a killed `save(..., overwrite=True)` left
    aside is an InterruptedReplaceError.
    """
    _check_arguments("load", directory=directory, skeleton=skeleton)
    directory = Path(directory)
    _require_checkpoint_directory(directory)
    manifest = read_manifest(directory)
    reader = CheckpointReader(directory)
    if skeleton is None:
        built = _hf_skeleton(manifest, directory)
        model = rebuild(manifest, built, example_inputs=_on_device_of(built, example_inputs),
                        leaf_modules=leaf_modules, inplace=True, where=str(directory))
    else:
        model = rebuild(manifest, skeleton, example_inputs=example_inputs, leaf_modules=leaf_modules,
                        where=str(directory))
    check_stored(model, {name: (info.shape, info.dtype) for name, info in reader.tensors.items()},
                 manifest.aliases, where=str(directory))
    tensors = reader.read(reader.tensors, aligned=True)
    assign_state(model, tensors, manifest.aliases, where=str(directory))
    return model


def _require_checkpoint_directory(directory: Path) -> None:
    """NotACheckpointError for a path that cannot be a native checkpoint (missing, a file, an
    empty directory); InterruptedReplaceError when a killed overwrite left the model aside."""
    aside = interrupted_replacement(directory.absolute())
    if aside is not None:
        raise InterruptedReplaceError(
            f"{directory} has no model: a process replacing it (save or convert with overwrite=True) was "
            f"killed after moving the previous model aside. That model is complete in {aside}: call "
            f"upcycle_fx.exporters.atomic.recover({str(directory)!r}) (any later write to {directory} "
            "does so too), or rename it back.")
    unfinished = [left.path.name for left in leftovers(directory.absolute()) if left.stale]
    note = (f" A write to it was interrupted ({unfinished[0]} beside it is unfinished; the next write "
            "there removes it): write the checkpoint again." if unfinished else "")
    if not directory.exists():
        raise NotACheckpointError(f"{directory} does not exist.{note}")
    if not directory.is_dir():
        hint = (" For a bare safetensors file use safetensors.torch.load_file."
                if directory.suffix == ".safetensors" else "")
        raise NotACheckpointError(f"{directory} is a file; upcycle_fx.load takes the directory that "
                                  f"upcycle_fx.save wrote.{hint}")
    if not any(directory.iterdir()):
        raise NotACheckpointError(f"{directory} is an empty directory, not an upcycle_fx checkpoint.{note}")


def _hf_skeleton(manifest: Manifest, directory: Path) -> nn.Module:
    """The dense transformers model of the manifest, on the meta device (no initialisation)."""
    if manifest.hf_config is None and manifest.model_class.startswith("transformers."):
        raise ManifestError(
            f"{directory / 'upcycle_fx.json'}: model_class is {manifest.model_class} but hf_config is "
            "missing, so the model cannot be rebuilt; the file is damaged: restore it, or pass the dense "
            "skeleton, upcycle_fx.load(dir, AutoModelForCausalLM.from_config(...)).")
    if manifest.hf_config is None:
        raise CheckpointError(
            f"{directory} holds a {manifest.model_class}, which is not a transformers model: pass its "
            "dense skeleton, e.g. upcycle_fx.load(dir, MyModel(...)) (built as before the rewrite).")
    import importlib

    module_name, _, class_name = manifest.model_class.rpartition(".")
    if module_name != "transformers" and not module_name.startswith("transformers."):
        raise CheckpointError(f"{directory}: model class {manifest.model_class} is not from transformers; "
                              "pass its dense skeleton to upcycle_fx.load.")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise CheckpointError(f"{directory}: {manifest.model_class} does not exist in this transformers "
                              f"({error}); install the version recorded in upcycle_fx.json: "
                              f"{manifest.versions.get('transformers')}.") from error
    try:
        config = cls.config_class.from_dict(dict(manifest.hf_config))
        if manifest.attn_implementation is not None:
            config._attn_implementation = manifest.attn_implementation
        with torch.device("meta"):
            return cls(config)
    except Exception as error:  # transformers raises many kinds for a config it cannot use
        raise ManifestError(
            f"{directory / 'upcycle_fx.json'}: hf_config does not build a {class_name} "
            f"({type(error).__name__}: {error}). The file is damaged, or was written with transformers "
            f"{manifest.versions.get('transformers')}: restore it, or install that version.") from error


def _check_arguments(function: str, **arguments: Any) -> None:
    """CheckpointError naming the first argument of `save` / `load` of the wrong kind, before
    any work."""
    expected = {"model": (nn.Module, "an nn.Module"), "skeleton": ((nn.Module, type(None)), "an nn.Module or None"),
                "directory": ((str, os.PathLike), "a path (str or os.PathLike)"),
                "format": (str, "'native' or 'hf'"), "hf_target": (str, "a target name such as 'auto'"),
                "overwrite": (bool, "True or False"), "verify": (bool, "True or False")}
    for name, value in arguments.items():
        kinds, what = expected[name]
        if not isinstance(value, kinds):
            raise CheckpointError(f"upcycle_fx.{function}: {name}={value!r} must be {what}.")
    if arguments.get("format") not in (None, "native", "hf"):
        raise CheckpointError(f"format={arguments['format']!r} is unknown; use 'native' or 'hf'.")


def _on_device_of(model: nn.Module, example_inputs: Any) -> Any:
    """The user's example inputs on the device of the skeleton load builds (the meta device)."""
    weight = next(iter(model.parameters()), None)
    if example_inputs is None or weight is None:
        return example_inputs
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: t.to(weight.device) if isinstance(t, torch.Tensor) else t, example_inputs)
