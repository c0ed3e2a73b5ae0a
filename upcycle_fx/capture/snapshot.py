"""`left_as_found(model)`: whatever capture and verification do while running the user's model,
the model comes back as it was.

Capture and verification run the input model (shadow values, the example forward, the dense
reference). A forward can change state: BatchNorm in train mode updates its running statistics,
a module may count its calls in a buffer, code may flip `.training`, add hooks or edit its
config. The snapshot is cheap (buffers are small; parameters are only watched through their
version counters, never copied), so it is taken around every run of the input model.
Buffers are copied back unconditionally: native kernels such as BatchNorm's update running
statistics without bumping the tensor's version counter.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ..errors import CaptureError

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
               "_backward_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _configs(model: nn.Module) -> list[object]:
    """Every distinct `config` object held by a module (Hugging Face models), sub-configs too."""
    found: dict[int, object] = {}
    pending = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")]
    while pending:
        config = pending.pop()
        if id(config) in found:
            continue
        found[id(config)] = config
        pending += [v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "__dict__")]
    return list(found.values())


@contextlib.contextmanager
def left_as_found(model: nn.Module) -> Iterator[None]:
    """Restore buffers (values and identity), train/eval modes, requires_grad flags, hooks and
    config attributes of `model` on exit; CaptureError if a parameter was changed in place (it
    is not copied, so it cannot be restored)."""
    modules = list(model.modules())
    buffers = [(m, name, b, b.detach().clone()) for m in modules
               for name, b in m._buffers.items() if b is not None]
    modes = [(m, m.training) for m in modules]
    hooks = [(m, attr, dict(getattr(m, attr))) for m in modules for attr in _HOOK_DICTS
             if hasattr(m, attr)]
    params = [(name, p, p.requires_grad, p._version) for name, p in model.named_parameters()]
    configs = [(c, dict(vars(c))) for c in _configs(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, saved in buffers:
                module._buffers[name] = buffer
                if not buffer.is_meta:  # kernels (BatchNorm) update buffers without a version bump
                    buffer.copy_(saved)
        for module, training in modes:
            module.training = training
        for module, attr, saved_hooks in hooks:
            current = getattr(module, attr)
            if current.keys() != saved_hooks.keys():
                current.clear()
                current.update(saved_hooks)
        for config, saved_attrs in configs:
            vars(config).clear()
            vars(config).update(saved_attrs)
        for _, p, requires_grad, _ in params:
            p.requires_grad_(requires_grad)
    changed = [name for name, p, _, version in params if p._version != version]
    if changed:
        raise CaptureError(
            f"{type(model).__name__}: running it to capture or verify changed parameters in place "
            f"({', '.join(changed[:4])}); they cannot be restored without a copy of every weight. "
            "Pass a copy of the model, or make its forward leave its parameters alone.")
