"""Bounded-memory conversion of a sharded Hugging Face checkpoint, planned on the meta device.

`convert_checkpoint(src, out)` never holds the whole model. The dense model is built from
`config.json` on the meta device (no data) in the checkpoint's dtype, its tensors are matched
with the stored ones through transformers' own key mapping (GPT-NeoX stores `embed_out` for
`lm_head`, ViT `encoder.layer.N` for `layers.N`: `hf_names.py`), checked against the shard
headers, and rewritten there by the ordinary pass (`upcycle(..., verify=False)`: capture,
matching and the rewrite all run on meta tensors). The rewritten meta model is the plan: every output tensor is either a
tensor of the input (read by name when its turn comes) or part of one MoE layer, which is built
by the same `build_moe` as the in-memory rewrite from that FFN's weights alone, in the same order
and with the same random generator. Output shards are written as they fill (`pipeline.py`).

Peak memory is about one output shard (by default no larger than the largest input shard), one
MoE layer with its dense FFN, and the interpreter with torch and transformers imported; it does
not grow with the number of layers. The output equals `save(upcycle(from_pretrained(src)))`
tensor for tensor (same seed), in the stored dtype (bf16 stays bf16). It is not run here:
`written_check.py` compares it with the source layer by layer, within the same memory.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ..api import upcycle
from ..config import UpcycleConfig
from ..moe import MoE
from ..passes import MLPList, MLPMatch
from ..passes.upcycle import build_moe
from ..report import active_parameters, count_parameters, moe_layers
from .atomic import refuse_overlap
from .checkpoint import NativeFormat
from .errors import CheckpointError
from .manifest import describe
from .pipeline import Unit, auxiliary_files, output_dtype, units_of, write_checkpoint
from .shards import CheckpointReader, Progress, parse_size
from .hf_names import runtime_names
from .state import check_tensor_names, tensor_table


@dataclass
class ConversionReport:
    """What `convert_checkpoint` did, for reports and benchmarks."""

    output: Path
    format: str
    architecture: str                 # the output's model class
    mlps: MLPList                     # every FFN found (execution order)
    converted: list[MLPMatch]
    params_before: int
    params_after: int
    active_params: float
    bytes_read: int                   # input weight files
    bytes_written: int                # output tensors
    shards: tuple[str, ...]
    largest_input_shard: int
    seconds: float


def convert_checkpoint(source: str | os.PathLike, output: str | os.PathLike,
                       config: UpcycleConfig | None = None, *, format: str = "native",
                       hf_target: str = "auto", max_shard_size: int | str | None = None,
                       overwrite: bool = False, progress: Progress | None = None,
                       dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu"
                       ) -> ConversionReport:
    """Upcycle the Hugging Face checkpoint in `source` into `output` without loading it whole.

    format: "native" (read back with `upcycle_fx.load`) or "hf" (a stock transformers MoE
    checkpoint, see `hf_moe.py`). max_shard_size: output shard limit (bytes or "2GB"); default
    the largest input shard, which keeps peak memory near 2x that shard. dtype: of the output's
    floating tensors (e.g. "bfloat16"); None keeps each tensor's stored dtype, and the output's
    config records the checkpoint's (its most common floating dtype). device: where each MoE
    layer is built (the same values on any device; written from the CPU). Tokenizer and other
    non-weight files are copied. Errors: MissingShardError / TruncatedShardError for damaged
    inputs, CheckpointMismatchError when config.json does not describe the weights,
    OutputExistsError when `output` holds a model, OutputOverlapsInputError when it is, holds or
    lies inside `source` (before any work); nothing is left behind on failure.
    """
    start = time.perf_counter()
    config = config or UpcycleConfig(seed=0)
    source = Path(source)
    refuse_overlap(Path(output).absolute(), (source,))
    max_bytes = None if max_shard_size is None else parse_size(max_shard_size)
    reader = CheckpointReader(source)
    cast = output_dtype(dtype)
    dense = _meta_model(source, cast or stored_dtype(reader))
    stored = runtime_names(dense, reader.tensors, where=str(source))
    _check_weights(dense, reader, stored, source)
    result = upcycle(dense, config, verify=False, inplace=False)
    upcycled = result.model
    table = tensor_table(upcycled)
    buffers = _non_persistent_buffers(dense)
    tensors = CheckpointTensors(reader, stored, dense, upcycled, result.converted, config, buffers,
                                dtype=cast, device=torch.device(device))
    if format == "native":
        fmt = NativeFormat(describe(upcycled, table))
        architecture = type(upcycled).__name__
    elif format == "hf":
        from .hf_moe import TARGETS, HFFormat

        fmt = HFFormat(upcycled, table, target=hf_target)
        architecture = TARGETS[fmt.target][1]
    else:
        raise CheckpointError(f"format={format!r} is unknown; use 'native' or 'hf'.")
    written = write_checkpoint(output, units_of(upcycled, table), tensors, fmt,
                               max_shard_bytes=max_bytes or reader.largest_shard_bytes, overwrite=overwrite,
                               progress=progress, extra_files=auxiliary_files(source), protect=(source,))
    return ConversionReport(written.path, format, architecture, result.mlps, result.converted,
                            result.params_before, count_parameters(upcycled), active_parameters(upcycled),
                            reader.total_bytes, written.nbytes, written.shards, reader.largest_shard_bytes,
                            time.perf_counter() - start)


def stored_dtype(reader: CheckpointReader) -> torch.dtype:
    """The checkpoint's dtype: that of most of its floating-point bytes (float32 if it has none)."""
    sizes: dict[torch.dtype, int] = {}
    for info in reader.tensors.values():
        if info.dtype.is_floating_point:
            sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    return max(sizes, key=sizes.get) if sizes else torch.float32


def _meta_model(source: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The dense model of `source/config.json` on the meta device in `dtype`, in eval mode (as
    from_pretrained)."""
    import transformers

    if not (source / "config.json").is_file():
        raise CheckpointError(f"{source}: no config.json; streaming conversion needs a Hugging Face "
                              "model directory (config.json + safetensors shards).")
    config = transformers.AutoConfig.from_pretrained(source, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not names:
        raise CheckpointError(f"{source}/config.json has no \"architectures\" entry, so the model class is "
                              "unknown; add one, e.g. \"architectures\": [\"LlamaForCausalLM\"].")
    if cls is None:
        raise CheckpointError(f"{source}/config.json names architecture {names[0]!r}, which is not a "
                              "transformers class; only stock transformers models can be streamed.")
    with torch.device("meta"):
        return cls._from_config(config, dtype=dtype).eval()


def _check_weights(dense: nn.Module, reader: CheckpointReader, stored: Mapping[str, str], source: Path) -> None:
    """The shards must hold exactly the tensors config.json implies (under their runtime names,
    `stored`: stored name -> runtime name, as transformers renames them). Extra tensors that
    `from_pretrained` ignores too are allowed: tied copies, keys the class lists in
    `_keys_to_ignore_on_load_unexpected`, and buffers that used to be stored (position ids, rotary
    tables), which are recomputed rather than read."""
    import re

    table = tensor_table(dense)
    skip = set(table.non_persistent)
    expected = {n: tuple(t.shape) for n, t in table.tensors.items() if n not in skip}
    patterns = list(getattr(dense, "_keys_to_ignore_on_load_unexpected", None) or []) + [r"rotary_emb\.inv_freq$"]
    ignored = [re.compile(p) for p in patterns]
    shapes = {stored[n]: s for n, s in reader.shapes().items()}
    found = {n: s for n, s in shapes.items() if n in expected or not (
        n in table.aliases or n in skip or any(p.search(n) for p in ignored))}
    check_tensor_names(f"{source}", expected, found,
                       f"{source}/config.json does not describe these weights (a config from another "
                       "model size or family?); put the matching config.json beside the shards.")


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Non-persistent buffers (rotary tables, position ids) of a transformers model on the meta
    device, computed as `from_pretrained` computes them (`_init_weights` on the owners)."""
    owners: dict[str, nn.Module] = {}
    for name, buffer in list(model.named_non_persistent_buffers()):
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        module.register_buffer(attr, torch.empty_like(buffer, device="cpu"), persistent=False)
        owners[path] = module
    for module in owners.values():
        model._init_weights(module)
    return dict(model.named_non_persistent_buffers())


class CheckpointTensors:
    """The upcycled model's tensors, produced from the input shards when asked for.

    `stored`: stored name -> runtime name of every input tensor. `dtype`: cast floating tensors
    to it (None: keep the stored dtype). `device`: where MoE layers are built."""

    def __init__(self, reader: CheckpointReader, stored: Mapping[str, str], dense: nn.Module, upcycled: nn.Module,
                 converted: list[MLPMatch], config: UpcycleConfig, buffers: Mapping[str, torch.Tensor], *,
                 dtype: torch.dtype | None = None, device: torch.device = torch.device("cpu")):
        self.reader, self.dense, self.config, self.buffers = reader, dense, config, buffers
        self.stored_name = {runtime: name for name, runtime in stored.items()}
        self.dtype, self.device = dtype, device
        self.plan = tensor_table(upcycled)
        self.match_of = {path: next(m for m in converted if m.index == moe.mlp_index)
                         for path, moe in moe_layers(upcycled)}
        self.pending: Iterator[MLPMatch] = iter(converted)   # MoE layers are built in this order
        self.built: dict[int, dict[str, torch.Tensor]] = {}
        self.generator = None if config.seed is None else torch.Generator().manual_seed(config.seed)
        self._check_plan()

    def _check_plan(self) -> None:
        moe_paths = tuple(f"{p}." for p in self.match_of)
        orphans = [n for n in self.plan.tensors if not n.startswith(moe_paths)
                   and n not in self.buffers and n not in self.stored_name]
        if orphans:
            raise CheckpointError(f"cannot find {orphans[:4]} of the upcycled model in the input checkpoint; "
                                  "this is a bug in upcycle_fx (please report it with the model's config).")

    def _out_dtype(self, stored: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and stored.is_floating_point else stored

    def _read(self, names: list[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Input tensors by runtime name, cast to the output dtype."""
        read = self.reader.read([self.stored_name[n] for n in names])
        out = {}
        for name in names:
            tensor = read[self.stored_name[name]]
            out[name] = tensor.to(device=device or tensor.device, dtype=self._out_dtype(tensor.dtype))
        return out

    def meta(self, unit: Unit) -> dict[str, torch.Tensor]:
        if unit.moe is None:
            name = unit.names[0]
            if name in self.buffers:
                return {name: torch.empty_like(self.buffers[name], device="meta")}
            info = self.reader.tensors[self.stored_name[name]]
            return {name: torch.empty(info.shape, dtype=self._out_dtype(info.dtype), device="meta")}
        up = self.match_of[unit.moe].site.up
        stored = self.reader.tensors[self.stored_name[_join(up.owner, up.weight)]].dtype
        dtype = self._out_dtype(stored)  # Experts.tile / Router use the dense weights' dtype
        return {n: torch.empty(self.plan.tensors[n].shape, device="meta",
                               dtype=torch.float32 if n.rpartition(".")[2] in MoE.FLOAT32_TENSORS else dtype)
                for n in unit.names}

    def tensors(self, unit: Unit) -> dict[str, torch.Tensor]:
        if unit.moe is None:
            name = unit.names[0]
            return {name: self.buffers[name]} if name in self.buffers else self._read([name])
        wanted = self.match_of[unit.moe].index
        while wanted not in self.built:
            match = next(self.pending)
            self.built[match.index] = self._build(match)
        moe_tensors = self.built.pop(wanted)
        out = {f"{unit.moe}.{n}": t for n, t in moe_tensors.items()}
        if list(out) != list(unit.names):
            raise CheckpointError(f"{unit.moe}: built tensors {list(out)[:4]} differ from the plan "
                                  f"{list(unit.names)[:4]}; this is a bug in upcycle_fx.")
        return out

    def _build(self, match: MLPMatch) -> dict[str, torch.Tensor]:
        """One MoE layer from its FFN's weights, by the rewrite's own `build_moe`."""
        names = []
        for p in match.site.projections:
            names += [_join(p.owner, p.weight)] + ([_join(p.owner, p.bias)] if p.bias else [])
        with _holding(self.dense, self._read(names, self.device)):
            moe = build_moe(match, self.dense, self.config, self.generator)
        return {n: t.detach().cpu() for n, t in tensor_table(moe).tensors.items()}


def _join(owner: str, attr: str) -> str:
    return f"{owner}.{attr}" if owner else attr


@contextlib.contextmanager
def _holding(model: nn.Module, tensors: Mapping[str, torch.Tensor]):
    """Temporarily give the meta `model` real data for `tensors` (the FFN being converted)."""
    saved = []
    for name, value in tensors.items():
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        old = getattr(module, attr)
        saved.append((module, attr, old))
        setattr(module, attr, nn.Parameter(value, requires_grad=False) if isinstance(old, nn.Parameter) else value)
    try:
        yield
    finally:
        for module, attr, old in reversed(saved):
            setattr(module, attr, old)
