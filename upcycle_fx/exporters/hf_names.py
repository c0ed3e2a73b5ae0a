"""Stored (on-disk) vs runtime tensor names of transformers models, by transformers' own mapping.

transformers 5 renames and reshapes some tensors between a checkpoint and the module tree:
GPT-NeoX stores `embed_out` for the runtime `lm_head`, ViT `encoder.layer.N.attention.query`
for `layers.N.attention.q_proj`, MoE models per-expert `experts.{i}.w1` for a fused
`experts.gate_up_proj`. The mapping is the model's `WeightRenaming` / `WeightConverter` list
(`conversion_mapping.get_model_conversion_mapping`), applied by `from_pretrained` when loading
and reverted by `save_pretrained`. This module is the one place that uses it, so that upcycle_fx
reads and writes exactly what transformers would, without a table of its own.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Iterable, Mapping

import torch
from torch import nn

from .errors import CheckpointError


class KeyMapping:
    """transformers' stored -> runtime key mapping of one model (built once: it walks the model)."""

    def __init__(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        self.model = model
        self.renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self.converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self.by_pattern = {p: c for c in self.converters for p in c.source_patterns}
        self.known = dict(model.state_dict(keep_vars=True))
        self.prefix = getattr(model, "base_model_prefix", None)

    def rename(self, name: str) -> tuple[str, str | None]:
        """(runtime name, the pattern of the converter that merges it with others, or None)."""
        from transformers.core_model_loading import rename_source_key

        runtime, pattern = rename_source_key(name, self.renamings, self.converters, self.prefix, self.known)
        if runtime not in self.known and name in self.known:  # as from_pretrained: keep a name the model has
            return name, None
        return runtime, pattern

    def groups(self, stored: Iterable[str]) -> dict[str, list[str]]:
        """{runtime name: the stored names it is made of}: one each, except where transformers
        merges several (per-expert tensors into one)."""
        groups: dict[str, list[str]] = {}
        for name in stored:
            groups.setdefault(self.rename(name)[0], []).append(name)
        return groups

    def load(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`stored` tensors (a part of a checkpoint) under the runtime names and layouts, as
        `from_pretrained` converts them (per-expert tensors fused, renamed keys mapped back).
        `stored` is emptied as its tensors are handed over, so each is freed once converted."""
        from transformers.core_model_loading import dot_natural_key

        out: dict[str, torch.Tensor] = {}
        pending: dict[str, object] = {}
        for name in sorted(stored, key=dot_natural_key):
            runtime, pattern = self.rename(name)
            tensor = stored.pop(name)
            if pattern is None:
                out[runtime] = tensor
            else:
                converter = pending.setdefault(runtime, deepcopy(self.by_pattern[pattern]))
                converter.add_tensor(runtime, name, pattern, tensor)
            del tensor
        for runtime in list(pending):
            out.update(pending.pop(runtime).convert(runtime, model=self.model, config=self.model.config))
        return out


def runtime_names(model: nn.Module, stored: Iterable[str], *, where: str) -> dict[str, str]:
    """{stored name: runtime name} for the tensors of a checkpoint of `model` (on any device),
    renamed as `from_pretrained` renames them. A stored tensor that transformers would reshape
    into another (a many-to-one conversion) cannot be read by name: CheckpointError."""
    mapping = KeyMapping(model)
    out: dict[str, str] = {}
    for name in stored:
        runtime, converted = mapping.rename(name)
        if converted is not None:
            raise CheckpointError(
                f"{where}: tensor {name} is converted by transformers ({converted} -> {runtime}) when "
                "loaded, which streaming does not do; load the model with from_pretrained and use "
                "upcycle_fx.upcycle + upcycle_fx.save instead.")
        out[name] = runtime
    return out


def stored_tensors(model: nn.Module, runtime: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`runtime` tensors of `model` under the names and layouts `save_pretrained` writes."""
    from transformers.core_model_loading import revert_weight_conversion

    return dict(revert_weight_conversion(model, dict(runtime)))
