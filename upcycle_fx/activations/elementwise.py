"""Whether a module or a function acts element by element: the probe that lets an activation in
by what it does rather than by its name.

The experts call the FFN's own activation on rows of hidden units, [rows, d_ff], gathered from
any tokens, where the dense FFN called it on [batch, seq, d_ff]. That is exact when each output
element depends only on the same input element. The probe runs the candidate on a random input
and checks: a tensor of the same shape comes back, the input is left as it was, the same input
gives the same output, the rows flattened or permuted give the same rows, and moving a few
elements up or down changes no other output element. Modules are probed on a CPU copy, in training and in
eval mode, and must leave their own state (running statistics, counters) unchanged. It rejects
softmax, norms, projections and anything that mixes positions or is random.
"""

from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from typing import Callable

import torch
from torch import Tensor, nn

PROBE_WIDTH = 32              # hidden units per row unless a parameter says otherwise
MAX_STATE_ELEMENTS = 1 << 20  # a module holding more is not an activation (an embedding table...)
PERTURBATION_ROUNDS = 2      # of 3 random elements each, changed up and down
_TOLERANCE = 1e-6             # relative, between layouts (flattened, permuted rows); in place: bitwise

_module_verdicts: "weakref.WeakKeyDictionary[nn.Module, str | None]" = weakref.WeakKeyDictionary()
_call_verdicts: dict[tuple, str | None] = {}


def module_problem(module: nn.Module) -> str | None:
    """None if `module` computes an element-wise function of its one input, else why not
    (remembered per module instance)."""
    if module not in _module_verdicts:
        from ..capture._fx_private import untraced_module_calls

        with untraced_module_calls():  # probed while FX traces: run the copy for real
            _module_verdicts[module] = _module_problem(module)
    return _module_verdicts[module]


def call_problem(fn: Callable[[Tensor], Tensor], key: tuple, like: Tensor | None = None) -> str | None:
    """None if `fn(x)` is element-wise on inputs shaped like `like` ([..., width]), else why not
    (remembered per `key`, which names the call and its constant arguments)."""
    width = int(like.shape[-1]) if isinstance(like, Tensor) and like.dim() >= 1 and like.shape[-1] > 0 else PROBE_WIDTH
    dtype = like.dtype if isinstance(like, Tensor) and like.is_floating_point() else torch.float32
    key = (*key, width, dtype)
    try:
        hash(key)
    except TypeError:
        return elementwise_problem(fn, width, dtype)
    if key not in _call_verdicts:
        _call_verdicts[key] = elementwise_problem(fn, width, dtype)
    return _call_verdicts[key]


def elementwise_problem(fn: Callable[[Tensor], Tensor], width: int = PROBE_WIDTH,
                        dtype: torch.dtype = torch.float32) -> str | None:
    """None if `fn` acts element by element on [..., width] inputs of `dtype`, else why not."""
    generator = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 3, width, generator=generator, device="cpu")).to(dtype)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = _run(fn, x)
            if not isinstance(y, Tensor) or y.shape != x.shape:
                shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
                return f"it maps a {tuple(x.shape)} input to {shape}, not to the same shape"
            if not _same(_run(fn, x), y):
                return "it is not deterministic (random, or it keeps state between calls)"
            rows = x.reshape(-1, width)
            if not _same(_run(fn, rows), y.reshape(-1, width)):
                return "its rows change when the leading dimensions are flattened"
            order = torch.randperm(rows.shape[0], generator=generator, device="cpu")
            if not _same(_run(fn, rows[order]), y.reshape(-1, width)[order]):
                return "its rows change when the rows are permuted: it mixes positions"
            for changed in _perturbations(x, generator):
                for step in (5.0, -5.0):   # both ways: a clamp upstream of the mixing cannot hide it
                    moved = ~_identical(_run(fn, torch.where(changed, x + step, x)), y)
                    if (moved & ~changed).any():
                        return "changing one element changes other output elements: it mixes elements"
    except _MutatesInput:
        return "it writes into its input"
    except Exception as error:  # noqa: BLE001 - any failure means we cannot vouch for it
        return f"it failed on a probe input: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def _perturbations(x: Tensor, generator: torch.Generator) -> list[Tensor]:
    """Masks of the few elements a perturbation changes: random ones, then the first element of
    one row and the last of another (a scan along the row shows at the first)."""
    masks = []
    for _ in range(PERTURBATION_ROUNDS):
        flat = torch.zeros(x.numel(), dtype=torch.bool, device="cpu")
        flat[torch.randperm(x.numel(), generator=generator, device="cpu")[:3]] = True
        masks.append(flat.reshape(x.shape))
    ends = torch.zeros(x.shape, dtype=torch.bool, device="cpu").reshape(-1, x.shape[-1])
    ends[0, 0] = ends[-1, -1] = True
    return masks + [ends.reshape(x.shape)]


class _MutatesInput(Exception):
    pass


def _run(fn: Callable[[Tensor], Tensor], x: Tensor):
    given = x.clone()
    y = fn(given)
    if not _same(given, x):
        raise _MutatesInput
    return y


def _close(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.double(), b.double()
    scale = b.abs().nan_to_num(0.0, 0.0, 0.0).max().clamp_min(1e-30)
    return ((a - b).abs() <= _TOLERANCE * scale) | (a.isnan() & b.isnan()) | (a == b)


def _identical(a: Tensor, b: Tensor) -> Tensor:
    """Bitwise equal (NaN equals NaN): what an element-wise op gives an unchanged element in the
    same place of the same layout."""
    return (a == b) | (a.isnan() & b.isnan())


def _same(a, b) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and bool(_close(a, b).all())


def _module_problem(module: nn.Module) -> str | None:
    if next(module.children(), None) is not None:
        return "it has submodules"
    if not _takes_one_input(module):
        return "its forward does not take exactly one input"
    state = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if sum(t.numel() for t in state) > MAX_STATE_ELEMENTS:
        return f"it holds more than {MAX_STATE_ELEMENTS} parameter and buffer elements"
    try:
        probe_copy = _cpu_copy(module)
    except Exception as error:  # noqa: BLE001 - a module we cannot copy is not probed
        return f"it cannot be copied for a probe: {type(error).__name__}"
    width = next((int(t.shape[-1]) for t in state if t.dim() >= 1 and t.shape[-1] > 1), PROBE_WIDTH)
    dtype = next((t.dtype for t in state if t.is_floating_point()), torch.float32)
    before = {name: t.clone() for name, t in probe_copy.state_dict().items() if isinstance(t, Tensor)}
    for training in (True, False):
        probe_copy.train(training)
        problem = elementwise_problem(probe_copy, width, dtype)
        if problem is not None:
            return f"in {'training' if training else 'eval'} mode {problem}"
    after = probe_copy.state_dict()
    if any(not torch.equal(t, after[name]) for name, t in before.items()):
        return "it changes its own parameters or buffers when called"
    return None


def _takes_one_input(module: nn.Module) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in parameters if p.default is p.empty and p.kind != p.VAR_POSITIONAL
                and p.kind != p.VAR_KEYWORD]
    return len(required) == 1 and positional and positional[0] is required[0]


def _cpu_copy(module: nn.Module) -> nn.Module:
    """A CPU copy to probe; tensors on the meta device get random values (element-wise or not
    does not depend on them)."""
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if any(t.device.type == "meta" for t in tensors):
        stand_in = copy.deepcopy(module).to_empty(device="cpu")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for t in [*stand_in.parameters(recurse=False), *stand_in.buffers(recurse=False)]:
                if t.is_floating_point():
                    t.copy_(torch.rand(t.shape, generator=generator, device="cpu").to(t.dtype) - 0.5)
        return stand_in
    return copy.deepcopy(module).to("cpu")
