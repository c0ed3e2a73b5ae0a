"""Bad input gives named errors, and never a half-written directory that looks like a model."""

from __future__ import annotations

import json

import pytest

import upcycle_fx
from upcycle_fx import (CheckpointError, CheckpointMismatchError, MissingShardError, NotACheckpointError,
                        OutputExistsError, TruncatedShardError, UpcycleConfig)
from upcycle_fx.exporters.checkpoint import NativeFormat
from upcycle_fx.exporters.manifest import describe
from upcycle_fx.exporters.pipeline import ModelSource, units_of, write_checkpoint
from upcycle_fx.exporters.state import tensor_table

from helpers import build

CONFIG = UpcycleConfig(num_experts=2, top_k=1, seed=0)


@pytest.fixture
def sharded(tmp_path):
    """A tiny Llama saved by transformers in several shards."""
    source = tmp_path / "dense"
    build("llama").save_pretrained(source, max_shard_size="100KB")
    assert len(list(source.glob("*.safetensors"))) > 2
    return source


def _nothing_left(parent, name="out") -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.partial-*"))


def test_missing_shard(sharded, tmp_path):
    """A shard named in the index is gone: MissingShardError names it, before anything is written."""
    victim = sorted(sharded.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MissingShardError, match=victim.name):
        upcycle_fx.convert_checkpoint(sharded, tmp_path / "out", CONFIG)
    assert _nothing_left(tmp_path)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text("{}")
    with pytest.raises(MissingShardError, match="no model.safetensors"):
        upcycle_fx.convert_checkpoint(tmp_path / "dense", tmp_path / "out", CONFIG)


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_shard(sharded, tmp_path, keep):
    """A shard cut short (in its data or its header): TruncatedShardError with the file and size."""
    victim = sorted(sharded.glob("model-*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[:max(5, int(len(data) * keep))])
    with pytest.raises(TruncatedShardError, match=f"{victim.name}.*not a complete safetensors file"):
        upcycle_fx.convert_checkpoint(sharded, tmp_path / "out", CONFIG)
    assert _nothing_left(tmp_path)


def test_truncated_native_checkpoint_does_not_load(tmp_path):
    upcycle_fx.save(upcycle_fx.rewrite(build("llama"), num_experts=2, seed=0), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(TruncatedShardError):
        upcycle_fx.load(tmp_path / "ckpt")


def test_config_that_does_not_match_the_weights(sharded, tmp_path):
    """config.json of another size: CheckpointMismatchError listing the tensors of wrong shape."""
    config = json.loads((sharded / "config.json").read_text())
    config["intermediate_size"] += 16
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"12 tensor\(s\) of another shape: model\.layers\.0\.mlp\.gate_proj\.weight: file \(160, 64\), expected \(176, 64\)"):
        upcycle_fx.convert_checkpoint(sharded, tmp_path / "out", CONFIG)
    config["intermediate_size"] -= 16
    config["num_hidden_layers"] += 1
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match=r"missing from the file: model\.layers\.4\."):
        upcycle_fx.convert_checkpoint(sharded, tmp_path / "out", CONFIG)
    assert _nothing_left(tmp_path)


def test_index_that_does_not_match_its_shards(sharded, tmp_path):
    index_file = sharded / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = sorted(set(index["weight_map"].values()))[0]
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointMismatchError, match="does not match its shards"):
        upcycle_fx.convert_checkpoint(sharded, tmp_path / "out", CONFIG)


def test_output_that_already_holds_a_model(sharded, tmp_path):
    """An existing model is not touched unless overwrite=True, which replaces it only once the new
    one is complete; a directory with other files is refused too."""
    out = tmp_path / "out"
    upcycle_fx.convert_checkpoint(sharded, out, CONFIG)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="already holds a model.*overwrite"):
        upcycle_fx.convert_checkpoint(sharded, out, CONFIG)
    with pytest.raises(OutputExistsError):
        upcycle_fx.save(upcycle_fx.rewrite(build("llama"), num_experts=2, seed=0), out)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    upcycle_fx.convert_checkpoint(sharded, out, UpcycleConfig(num_experts=3, top_k=1, seed=0), overwrite=True)
    assert json.loads((out / "upcycle_fx.json").read_text())["moe_layers"][0]["num_experts"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense", "out"]
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty"):
        upcycle_fx.convert_checkpoint(sharded, other, CONFIG)


def test_empty_existing_directory_is_fine(sharded, tmp_path):
    (tmp_path / "out").mkdir()
    upcycle_fx.convert_checkpoint(sharded, tmp_path / "out", CONFIG)
    assert (tmp_path / "out" / "upcycle_fx.json").is_file()


class _Interrupted(RuntimeError):
    pass


class _FailAfter:
    """Progress callback that fails after some tensors, like a full disk or Ctrl-C midway."""

    def __init__(self, tensors: int) -> None:
        self.left = tensors

    def start(self, tensors, shards, nbytes):
        pass

    def shard(self, filename):
        pass

    def tensor(self, name, nbytes):
        self.left -= 1
        if self.left == 0:
            raise _Interrupted(name)


def test_failure_midway_leaves_nothing_behind(sharded, tmp_path):
    """Shards already written are in a hidden staging directory, removed on failure; the target
    never appears."""
    with pytest.raises(_Interrupted):
        upcycle_fx.convert_checkpoint(sharded, tmp_path / "out", CONFIG, max_shard_size=50_000,
                                      progress=_FailAfter(30))
    assert _nothing_left(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_failed_final_check_leaves_nothing_behind(tmp_path):
    """The format's last check (for --format hf: load and compare logits) runs before the move."""
    model = upcycle_fx.rewrite(build("llama"), num_experts=2, seed=0)
    table = tensor_table(model)

    class Rejecting(NativeFormat):
        def check(self, directory):
            assert (directory / "model.safetensors").is_file()  # complete, but not in place
            raise CheckpointError("rejected")

    with pytest.raises(CheckpointError, match="rejected"):
        write_checkpoint(tmp_path / "out", units_of(model, table), ModelSource(table),
                         Rejecting(describe(model, table)), max_shard_bytes=10**9)
    assert _nothing_left(tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    upcycle_fx.save(upcycle_fx.rewrite(build("llama"), num_experts=2, seed=0), tmp_path / "ckpt")
    manifest_file = tmp_path / "ckpt" / "upcycle_fx.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["format_version"] = 99
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format version 99.*Upgrade upcycle_fx"):
        upcycle_fx.load(tmp_path / "ckpt")


def test_not_a_native_checkpoint(sharded):
    with pytest.raises(NotACheckpointError, match="not an upcycle_fx checkpoint.*AutoModelForCausalLM"):
        upcycle_fx.load(sharded)


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="format='onnx' is unknown"):
        upcycle_fx.save(upcycle_fx.rewrite(build("llama"), num_experts=2, seed=0), tmp_path / "x", format="onnx")
    assert not (tmp_path / "x").exists()
