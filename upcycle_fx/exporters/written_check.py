"""Checking a written checkpoint against its dense source without loading either model whole.

Loading the upcycled model and the dense one to compare their logits needs both in memory (for
a 246M bf16 Llama with 8 experts: 6.4 GB). This check reads one layer at a time instead:

* every converted FFN: the dense FFN's modules (from the source shards) and the written MoE
  layer (from the output shards: an upcycle_fx `MoE` for format="native", the stock MoE block
  of the target class, built from the written config.json, for format="hf") are materialised
  alone from their meta-device models, in float32 on `device`, and run on the same random
  hidden states; their relative difference is the layer's error. Dense weights are rounded to
  the written dtype first, so a bf16 output of a float32 model is compared fairly.
* every other written tensor is compared with the dense tensor of the same (runtime) name.

Computing in float32 makes the bar the same for every storage dtype: a function-preserving
configuration (top-k, renormalised weights, no noise, no capacity limit) gives errors of float32
rounding, and `tolerance` is 1e-5 (DESIGN §8). Peak memory: the interpreter, the two meta-device
models, one tensor or one MoE layer in float32 and its dense FFN (about 2 x the largest shard + 1
GB for the 1.1B Llama shape: `benchmarks/convert_memory.py --check`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ..passes import find_mlps, plan_swap
from ..passes.inline_ffn import is_dropout
from ..report import first_tensor, relative_error
from .errors import CheckpointError
from .hf_names import KeyMapping, runtime_names
from .manifest import read_manifest, rebuild
from .shards import CheckpointReader
from .streaming import _meta_model, stored_dtype

TOLERANCE = 1e-5  # relative, float32 computation, function-preserving configurations


@dataclass(frozen=True)
class WrittenCheck:
    """What `check_written` found."""

    max_relative_error: float   # over the MoE layers and the other tensors
    tolerance: float            # the bar for function-preserving configurations
    dtype: torch.dtype          # the written weights' dtype (the check computes in float32)
    layers_checked: int         # converted FFNs compared with their MoE layer
    layers_skipped: int         # FFNs spliced into a traced graph: no module of their own to run
    tensors_compared: int       # other written tensors compared with the dense ones
    worst: str                  # where the largest error is

    @property
    def ok(self) -> bool:
        return self.max_relative_error <= self.tolerance


def written_error(source: str | os.PathLike, written: str | os.PathLike, format: str = "native", *,
                  device: str | torch.device = "cpu") -> float:
    """The largest relative error of the checkpoint in `written` against the dense one in
    `source` (see `check_written`)."""
    return check_written(source, written, format, device=device).max_relative_error


def check_written(source: str | os.PathLike, written: str | os.PathLike, format: str = "native", *,
                  device: str | torch.device = "cpu", tokens: int = 32, seed: int = 0) -> WrittenCheck:
    """Compare the checkpoint `written` (by `save` or `convert_checkpoint`, in `format`) with the
    dense Hugging Face checkpoint `source` it was made from, layer by layer (see the module
    docstring); `tokens` random hidden states (seeded) per layer, computed on `device`."""
    source, written, device = Path(source), Path(written), torch.device(device)
    if format not in ("native", "hf"):
        raise CheckpointError(f"format={format!r} is unknown; use 'native' or 'hf'.")
    dense = _Side.dense(source)
    out = _Side.native(written, dense.model) if format == "native" else _Side.hf(written)
    written_dtype = stored_dtype(out.reader)
    rounded = (lambda t: t.to(written_dtype)) if written_dtype != stored_dtype(dense.reader) else (lambda t: t)
    generator = torch.Generator().manual_seed(seed)
    worst, where, checked, skipped = 0.0, "", 0, 0
    moe_paths = []
    for match in find_mlps(dense.model):
        swap = plan_swap(match)
        path = out.moe_path(match, swap)
        if path is None:
            continue
        moe_paths.append(path)
        if swap is None or any(not is_dropout(node) for node in swap.inline):
            skipped += 1  # spliced, or a functional activation between the modules: not a module chain
            continue
        x = torch.randn(1, tokens, match.d_model, generator=generator).to(device)
        with torch.no_grad():
            expected = x
            for module_path in (swap.host, *swap.folded):
                expected = first_tensor(dense.module(module_path, device, rounded)(expected))
            actual = first_tensor(out.module(path, device)(x))
        error = relative_error(actual.cpu(), expected.cpu())
        checked += 1
        if not error <= worst:
            worst, where = error, f"MoE layer {path} (FFN #{match.index})"
    compared = 0
    for name in out.other_tensors(moe_paths):
        if name not in dense.stored:
            continue
        actual = out.tensor(name)
        error = _difference(actual, dense.tensor(name).to(actual.dtype))
        compared += 1
        if not error <= worst:
            worst, where = error, f"tensor {name}"
    return WrittenCheck(worst, TOLERANCE, written_dtype, checked, skipped, compared, where)


class _Side:
    """One checkpoint: its reader, its model on the meta device and its runtime -> stored names."""

    def __init__(self, reader: CheckpointReader, model: nn.Module, stored: dict[str, list[str]], *,
                 convert: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]] = dict,
                 moe_paths: dict[int, str] | None = None, skip: frozenset[str] = frozenset()) -> None:
        self.reader, self.model, self.stored, self.convert = reader, model, stored, convert
        self.moe_paths, self.skip = moe_paths, skip

    @classmethod
    def dense(cls, source: Path) -> "_Side":
        reader = CheckpointReader(source)
        model = _meta_model(source, torch.float32)
        names = runtime_names(model, reader.tensors, where=str(source))
        return cls(reader, model, {runtime: [name] for name, runtime in names.items()},
                   convert=lambda tensors: {names[k]: v for k, v in tensors.items()})

    @classmethod
    def native(cls, written: Path, dense: nn.Module) -> "_Side":
        manifest = read_manifest(written)
        reader = CheckpointReader(written)
        model = rebuild(manifest, dense)
        return cls(reader, model, {n: [n] for n in reader.tensors},
                   moe_paths={r.mlp_index: r.path for r in manifest.moe_layers},
                   skip=frozenset(manifest.non_persistent))

    @classmethod
    def hf(cls, written: Path) -> "_Side":
        import transformers

        config = transformers.AutoConfig.from_pretrained(written, local_files_only=True)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        reader = CheckpointReader(written)
        mapping = KeyMapping(model)
        return cls(reader, model, mapping.groups(reader.tensors), convert=mapping.load)

    # ---- structure
    def moe_path(self, match, swap) -> str | None:
        """Where the written checkpoint has the MoE layer of dense FFN `match`, or None."""
        if self.moe_paths is not None:
            return self.moe_paths.get(match.index)
        if swap is None:
            return None
        try:
            module = self.model.get_submodule(swap.host)
        except AttributeError:
            return None
        return swap.host if hasattr(module, "experts") else None

    def other_tensors(self, moe_paths: list[str]) -> list[str]:
        """Runtime names of the written tensors outside the MoE layers."""
        prefixes = tuple(f"{p}." for p in moe_paths)
        return [n for n in self.stored if not n.startswith(prefixes) and n not in self.skip]

    # ---- data
    def tensor(self, name: str) -> torch.Tensor:
        """The tensor of runtime name `name`, as stored (dtype included)."""
        return self.convert(self.reader.read(self.stored[name]))[name]

    def module(self, path: str, device: torch.device,
               rounded: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> nn.Module:
        """The submodule at `path` alone, with its stored weights (`rounded`), in float32 on
        `device`; read and cast one tensor at a time, so that at most one is held twice."""
        module = copy.deepcopy(self.model.get_submodule(path))
        tensors = {name: rounded(self.tensor(f"{path}.{name}")).to(device, torch.float32)
                   for name in module.state_dict(keep_vars=True)}
        module.load_state_dict(tensors, assign=True, strict=True)
        meta = [n for n, t in module.named_buffers() if t.device.type == "meta"]
        if meta:
            raise CheckpointError(f"{path}: buffers {meta[:3]} have no data; this check cannot run it.")
        return module.eval()


def _difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (as `report.relative_error`) in slices of a million elements, so
    that comparing an embedding does not hold float64 copies of it."""
    if torch.equal(actual, expected):
        return 0.0
    a, e = actual.reshape(-1), expected.reshape(-1)
    step = 1 << 20
    diff = max(float((a[i:i + step].double() - e[i:i + step].double()).abs().max()) for i in range(0, a.numel(), step))
    scale = max(float(e[i:i + step].abs().max()) for i in range(0, e.numel(), step))
    return diff / max(scale, torch.finfo(torch.float32).tiny)
