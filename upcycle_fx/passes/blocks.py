"""Where an FFN sits: the stack of repeated blocks that holds it, and its index there."""

from __future__ import annotations

from typing import Sequence

from torch import nn


def common_path(paths: Sequence[str]) -> str:
    """Deepest module path that is a prefix (component-wise) of every path."""
    split = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)


def block_position(model: nn.Module, paths: Sequence[str]) -> tuple[str | None, int | None]:
    """(container path, block index) of the deepest ModuleList/Sequential of repeated blocks
    (at least two children of one class) that holds all of `paths`; (None, None) if none.

    T5's `block.3.layer.1` counts as block 3 of `encoder.block` (its `layer` list mixes
    attention and FFN classes, so it is no stack); encoder and decoder are separate stacks.
    """
    parts = common_path(paths).split(".")
    found: tuple[str | None, int | None] = (None, None)
    for i, part in enumerate(parts):
        if not part.isdigit():
            continue
        container_path = ".".join(parts[:i])
        container = model.get_submodule(container_path)
        if not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        block_class = type(container[int(part)])
        if sum(type(child) is block_class for child in container) >= 2:
            found = (container_path, int(part))
    return found
