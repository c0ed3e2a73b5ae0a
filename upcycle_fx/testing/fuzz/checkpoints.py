"""Checkpoint corruption at every structural level, then `upcycle_fx.load`.

A saved upcycled model is damaged in one way (the manifest `upcycle_fx.json` as a whole, its
fields, one MoE record, the safetensors index, one tensor's dtype / shape / presence, a shard's
bytes) and loaded back. `load` must raise a named error or give back the saved model bit for bit;
anything else (an unnamed exception, a model with other weights or dtypes) is a defect.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from hypothesis import strategies as st

from .models import ModelSpec
from .oracle import Category, Outcome, Snapshot, classify_exception, compare_outputs, eval_forward
from .rewriting import model_specs

MANIFEST = "upcycle_fx.json"
INDEX = "model.safetensors.index.json"
SMALL_SHARDS = 4000  # bytes: several shards and an index for the fuzz models

# --------------------------------------------------------------------------- corruptions


def _edit_json(path: Path, edit: Callable[[object], object]) -> None:
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _manifest(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    return lambda directory: _edit_json(directory / MANIFEST, edit)


def _record(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(data: dict) -> dict:
        edit(data["moe_layers"][0])
        return data
    return _manifest(apply)


def _set(key: str, value) -> Callable[[dict], dict]:
    return lambda data: {**data, key: value}


def _drop(key: str) -> Callable[[dict], dict]:
    return lambda data: {k: v for k, v in data.items() if k != key}


def _record_set(key: str, value) -> Callable[[Path], None]:
    return _record(lambda record: record.__setitem__(key, value))


def _record_drop(key: str) -> Callable[[Path], None]:
    return _record(lambda record: record.pop(key))


def _shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def _rewrite_tensor(change: Callable[[dict[str, torch.Tensor]], None], pick: str = "experts"):
    """Load the shard that holds the first tensor whose name contains `pick`, change it, save it."""
    def apply(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        for shard in _shards(directory):
            tensors = load_file(str(shard))
            names = [n for n in tensors if pick in n]
            if names:
                change(tensors, names[0])
                save_file(tensors, str(shard), metadata={"format": "pt"})
                return
        raise AssertionError(f"no tensor named like {pick!r} in {directory}")
    return apply


def _truncate(directory: Path) -> None:
    shard = _shards(directory)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _delete_shard(directory: Path) -> None:
    _shards(directory)[0].unlink()


MANIFEST_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "manifest_list": lambda d: (d / MANIFEST).write_text("[]"),
    "manifest_null": lambda d: (d / MANIFEST).write_text("null"),
    "manifest_number": lambda d: (d / MANIFEST).write_text("42"),
    "manifest_string": lambda d: (d / MANIFEST).write_text('"upcycle_fx"'),
    "manifest_empty_object": lambda d: (d / MANIFEST).write_text("{}"),
    "manifest_cut_json": lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text()[:40]),
    "manifest_missing": lambda d: (d / MANIFEST).unlink(),
    "manifest_missing_moe_layers": _manifest(_drop("moe_layers")),
    "manifest_missing_model_class": _manifest(_drop("model_class")),
    "manifest_missing_format_version": _manifest(_drop("format_version")),
    "manifest_unknown_key": _manifest(_set("surprise", {"a": 1})),
    "manifest_moe_layers_object": _manifest(_set("moe_layers", {})),
    "manifest_moe_layers_null": _manifest(_set("moe_layers", None)),
    "manifest_format_version_string": _manifest(_set("format_version", "one")),
    "manifest_format_version_future": _manifest(_set("format_version", 99)),
    "manifest_versions_null": _manifest(_set("versions", None)),
    "manifest_folded_list": _manifest(_set("folded", ["x"])),
    "manifest_aliases_dangling": _manifest(_set("aliases", {"head.weight": "nowhere.weight"})),
    "manifest_training_string": _manifest(_set("training", "yes")),
    "manifest_other_mode_bogus": _manifest(_set("other_mode", ["no.such.module"])),
    "manifest_model_class_other": _manifest(_set("model_class", "collections.OrderedDict")),
    "record_null": _manifest(lambda data: {**data, "moe_layers": [None] + data["moe_layers"][1:]}),
    "record_list": _manifest(lambda data: {**data, "moe_layers": [[]] + data["moe_layers"][1:]}),
    "record_missing_d_ff": _record_drop("d_ff"),
    "record_missing_settings": _record_drop("settings"),
    "record_unknown_field": _record_set("surprise", 1),
    "record_num_experts_string": _record_set("num_experts", "3"),
    "record_num_experts_negative": _record_set("num_experts", -3),
    "record_num_experts_more": _record_set("num_experts", 5),
    "record_mlp_index_out_of_range": _record_set("mlp_index", 99),
    "record_path_elsewhere": _record_set("path", "head"),
    "record_unknown_dispatch_impl": _record_set("dispatch_impl", "warp_drive"),
    "record_unknown_activation": _record_set("activation", "tanhh"),
    "record_settings_null": _record_set("settings", None),
    "record_settings_unknown_key": _record(lambda r: r["settings"].__setitem__("surprise", 1)),
    "record_settings_bad_top_k": _record(lambda r: r["settings"].__setitem__("top_k", "two")),
    "record_hidden_dropout_string": _record_set("hidden_dropout", "0.1"),
}

INDEX_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "index_list": lambda d: (d / INDEX).write_text("[]"),
    "index_null": lambda d: (d / INDEX).write_text("null"),
    "index_weight_map_list": lambda d: _edit_json(d / INDEX, lambda x: {**x, "weight_map": []}),
    "index_weight_map_null": lambda d: _edit_json(d / INDEX, lambda x: {**x, "weight_map": None}),
    "index_missing_weight_map": lambda d: _edit_json(d / INDEX, lambda x: {"metadata": x.get("metadata")}),
    "index_missing_file": lambda d: _edit_json(d / INDEX, lambda x: {
        **x, "weight_map": {k: "model-09999-of-09999.safetensors" for k in x["weight_map"]}}),
    "index_drops_tensor": lambda d: _edit_json(d / INDEX, lambda x: {
        **x, "weight_map": dict(list(x["weight_map"].items())[1:])}),
    "index_deleted": lambda d: (d / INDEX).unlink(),
}


def _cast(dtype: torch.dtype):
    def change(tensors, name):
        tensors[name] = (tensors[name] * (1 + 1e-9) if dtype == torch.float64 else tensors[name]).to(dtype)
    return change


TENSOR_CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "tensor_int32": _rewrite_tensor(_cast(torch.int32)),
    "tensor_float64": _rewrite_tensor(_cast(torch.float64)),
    "tensor_bfloat16": _rewrite_tensor(_cast(torch.bfloat16)),
    "tensor_router_float16": _rewrite_tensor(_cast(torch.float16), pick="router"),
    "tensor_wrong_shape": _rewrite_tensor(lambda t, n: t.__setitem__(n, t[n].flatten()[:-1].clone())),
    "tensor_missing": _rewrite_tensor(lambda t, n: t.pop(n)),
    "tensor_extra": _rewrite_tensor(lambda t, n: t.__setitem__("surprise.weight", torch.zeros(3))),
    "tensor_renamed": _rewrite_tensor(lambda t, n: t.__setitem__(n + "_x", t.pop(n))),
    "shard_truncated": _truncate,
    "shard_deleted": _delete_shard,
    "shard_empty": lambda d: _shards(d)[0].write_bytes(b""),
    "shard_garbage": lambda d: _shards(d)[0].write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"),
}

CORRUPTIONS = {"none": lambda d: None, **MANIFEST_CORRUPTIONS, **INDEX_CORRUPTIONS, **TENSOR_CORRUPTIONS}

# --------------------------------------------------------------------------- saved models

_SAVED: dict[tuple, tuple[torch.nn.Module, Path]] = {}
_ROOT: list[Path] = []


def saved_model(spec: ModelSpec, sharded: bool) -> tuple[torch.nn.Module, Path]:
    """An upcycled model of `spec` and a pristine checkpoint of it (made once per process)."""
    import upcycle_fx

    key = (spec, sharded)
    if key not in _SAVED:
        if not _ROOT:
            _ROOT.append(Path(tempfile.mkdtemp(prefix="upcycle-fx-fuzz-")))
        model = upcycle_fx.rewrite(spec.build(), pattern="all", num_experts=3, top_k=2, seed=0)
        directory = _ROOT[0] / f"saved-{len(_SAVED)}"
        upcycle_fx.save(model, directory, max_shard_size=SMALL_SHARDS if sharded else 10**9)
        _SAVED[key] = (model, directory)
    return _SAVED[key]


def loaded_matches(model: torch.nn.Module, loaded: torch.nn.Module, inputs: tuple) -> Outcome:
    """The loaded model must be the saved one: every tensor bit for bit, modes, same outputs."""
    differences = Snapshot.of(model, hooks_by_kind=True).differences(loaded, hooks_by_kind=True)
    if differences:
        return Outcome(Category.SILENT_WRONG, "loaded model differs from the saved one: "
                       + "; ".join(differences[:3]))
    return compare_outputs(eval_forward(loaded, inputs), eval_forward(model, inputs), preserves=True)


@dataclass(frozen=True)
class CheckpointCase:
    """Save `spec`'s upcycled model, apply `corruption`, load it back."""

    spec: ModelSpec
    corruption: str = "none"
    sharded: bool = False

    @property
    def kind(self) -> str:
        return self.corruption

    def run(self) -> Outcome:
        import upcycle_fx

        model, pristine = saved_model(self.spec, self.sharded)
        with tempfile.TemporaryDirectory(prefix="upcycle-fx-fuzz-") as tmp:
            directory = Path(tmp) / "checkpoint"
            shutil.copytree(pristine, directory)
            CORRUPTIONS[self.corruption](directory)
            try:
                loaded = upcycle_fx.load(directory, self.spec.build())
            except Exception as error:  # noqa: BLE001
                return classify_exception(error, "load")
        try:
            return loaded_matches(model, loaded, (self.spec.inputs(),))
        except Exception as error:  # noqa: BLE001
            return classify_exception(error, "first forward of the loaded model")


@st.composite
def checkpoint_cases(draw, corruption: str) -> CheckpointCase:
    # few distinct models (each is saved once per process): sizes fixed, style and twist drawn
    spec = draw(model_specs(twist=draw(st.sampled_from(("none", "dropout_train")))))
    spec = ModelSpec(style=spec.style, act=spec.act, bias=spec.bias, twist=spec.twist, layers=2)
    sharded = corruption in INDEX_CORRUPTIONS or draw(st.booleans())
    return CheckpointCase(spec, corruption, sharded)
