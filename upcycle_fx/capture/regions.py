"""Capture: the whole model where it traces, otherwise the smallest regions that do.

Regions are tried top-down: the model, then each child that holds at least two projection
layers, recursively, until a region traces. Each failure is kept with its reason so that a
model the pass cannot see into fails loudly, never silently.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError
from .inputs import ModelInputs, resolve_inputs
from .leaves import LeafPolicy, is_projection_module
from .tracer import CaptureTracer, ModuleSpan

_WRAPPED = "wrapped"


@dataclass
class CapturedRegion:
    """One traced region of the user's model. Graph targets are relative to `root`."""

    prefix: str               # path of the region in the user's model ('' = whole model)
    root: nn.Module           # the traced root (the region itself, or a call wrapper around it)
    graph: fx.Graph
    spans: list[ModuleSpan]
    call_counts: Counter      # absolute module path -> calls seen in this region
    specializations: list[str]
    inner: str = ""           # path of the region inside `root` ('' or 'wrapped')

    def absolute(self, target: str) -> str:
        """Absolute module/parameter path in the user's model for a graph target."""
        if self.inner:
            target = "" if target == self.inner else target.removeprefix(self.inner + ".")
        return ".".join(p for p in (self.prefix, target) if p)

    def module(self, target: str) -> nn.Module:
        return self.root.get_submodule(target)


@dataclass
class Capture:
    regions: list[CapturedRegion]
    failures: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)


class _CallWrapper(nn.Module):
    """Calls `wrapped` with recorded (args, kwargs): tensors become placeholders, the rest is
    baked in. Gives the trace root a plain fixed-arity signature (HF 5.x forwards are wrapped in
    `(*args, **kwargs)` decorators that FX cannot trace as a root)."""

    def __init__(self, module: nn.Module, inputs: ModelInputs) -> None:
        super().__init__()
        self.wrapped = module
        flat, self._spec = pytree.tree_flatten((inputs.args, inputs.kwargs))
        self._is_tensor = [isinstance(x, torch.Tensor) for x in flat]
        self._constants = [None if t else x for x, t in zip(flat, self._is_tensor)]
        self.example_tensors = [x for x, t in zip(flat, self._is_tensor) if t]

    def call(self, *tensors):
        supply = iter(tensors)
        flat = [next(supply) if t else c for t, c in zip(self._is_tensor, self._constants)]
        args, kwargs = pytree.tree_unflatten(flat, self._spec)
        return self.wrapped(*args, **kwargs)


def _wrapper_class(arity: int) -> type[_CallWrapper]:
    names = ", ".join(f"t{i}" for i in range(arity))
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.call({names})\n", namespace)  # noqa: S102
    return type(f"CallWrapper{arity}", (_CallWrapper,), {"forward": namespace["forward"]})


def trace_region(module: nn.Module, prefix: str, inputs: ModelInputs | None,
                 leaf_policy: LeafPolicy | None = None) -> CapturedRegion:
    """Trace one module: symbolically without inputs, with shadow values with inputs."""
    if inputs is None:
        tracer = CaptureTracer(leaf_policy)
        root, inner = module, ""
    else:
        probe = _CallWrapper(module, inputs)
        root = _wrapper_class(len(probe.example_tensors))(module, inputs)
        tracer = CaptureTracer(leaf_policy, shadow_inputs=root.example_tensors)
        inner = _WRAPPED
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = tracer.trace(root)
    spans = tracer.spans
    if inputs is None:  # the root's own call is no call_module: give it a span too
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        output = next(n for n in graph.nodes if n.op == "output")
        spans = [*spans, ModuleSpan("", placeholders, list(output.all_input_nodes),
                                    len(placeholders), tracer.node_count)]
    region = CapturedRegion(prefix, root, graph, spans, Counter(), tracer.specializations, inner)
    for path, count in tracer.call_counts.items():
        region.call_counts[region.absolute(path)] += count
    region.call_counts[prefix] = max(region.call_counts[prefix], 1)
    return region


def holds_projections(module: nn.Module) -> bool:
    """At least two projection layers (modules, or raw 2-D weights) live under `module`."""
    count = sum(1 for m in module.modules() if is_projection_module(m))
    count += sum(1 for m in module.modules() if not is_projection_module(m)
                 for p in m.parameters(recurse=False) if p.dim() == 2)
    return count >= 2


@dataclass
class ExampleRun:
    """What one example forward showed: each module's first (args, kwargs) and how many times
    each module object was called (by identity: a module shared by two blocks has two paths)."""

    inputs: dict[str, ModelInputs]
    calls: Counter  # id(module) -> calls


def record_module_inputs(model: nn.Module, inputs: ModelInputs) -> ExampleRun:
    """Run the model once and keep the (args, kwargs) of every module's first call and how many
    times each module was called; CaptureError naming the innermost running module if the
    forward fails (example inputs of the wrong shape, dtype or device)."""
    seen: dict[str, ModelInputs] = {}
    calls: Counter = Counter()
    running: list[str] = []
    handles = []
    for path, module in model.named_modules():
        def pre_hook(mod, args, kwargs, path=path):
            seen.setdefault(path, ModelInputs(tuple(args), dict(kwargs)))
            calls[id(mod)] += 1
            running.append(path)

        def post_hook(mod, args, output, path=path):
            running.pop()

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook))
    try:
        with torch.no_grad():
            inputs.call(model)
    except Exception as error:  # noqa: BLE001 - named with the module that failed
        where = running[-1] if running else ""
        module = model.get_submodule(where)
        raise CaptureError(
            f"{type(model).__name__}: the forward on example_inputs fails in "
            f"{where or '<model>'} ({type(module).__name__}): {_reason(error)}. Pass inputs of "
            "the shape, dtype and device the model takes, as for one ordinary forward call.") from error
    finally:
        for handle in handles:
            handle.remove()
    return ExampleRun(seen, calls)


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}"[:300]


def capture(model: nn.Module, example_inputs: Any = None,
            leaf_policy: LeafPolicy | None = None) -> Capture:
    """Capture `model` as one graph, or (with inputs) as the smallest regions that trace.

    With inputs, the model first runs once on them (unless its weights are on the meta device:
    a skeleton has nothing to run on): inputs it cannot take are a CaptureError
    naming the failing module (not a trace that silently loses its shadow values), and the
    run counts each module's calls (a module shared between regions is called once in each
    region's trace). Descending into regions needs this run too: it shows which modules are
    really called through their own `forward` (a parent may call a child's submodules
    directly, and a region traced on its own would then describe code that never runs).
    """
    inputs = resolve_inputs(model, example_inputs)
    on_meta = any(p.is_meta for p in model.parameters())  # a skeleton: no data to run on
    run = None if inputs is None or on_meta else record_module_inputs(model, inputs)
    try:
        captured = Capture([trace_region(model, "", inputs, leaf_policy)])
    except Exception as error:  # noqa: BLE001 - any trace failure sends us one level down
        if inputs is None:
            raise CaptureError(
                f"{type(model).__name__}: torch.fx cannot trace it symbolically ({_reason(error)}); "
                "pass example_inputs= (a tensor, tuple or dict for one forward call) so that "
                "capture can follow the data, or mark the failing module with leaf_modules=.") from error
        run = run or record_module_inputs(model, inputs)
        captured = _capture_regions(model, run, leaf_policy, [("", _reason(error))])
    if run is not None:
        for region in captured.regions:
            for path in list(region.call_counts):
                with contextlib.suppress(AttributeError):
                    calls = run.calls[id(model.get_submodule(path))]
                    region.call_counts[path] = max(region.call_counts[path], calls)
    return captured


def _capture_regions(model: nn.Module, run: ExampleRun, leaf_policy: LeafPolicy | None,
                     failures: list[tuple[str, str]]) -> Capture:
    """The smallest modules holding projections that trace, each with its recorded inputs."""
    recorded = run.inputs
    regions: list[CapturedRegion] = []

    def descend(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if not holds_projections(child):
                continue  # cannot hold an FFN
            if path not in recorded:  # never called itself (a ModuleList): look inside
                descend(child, path)
                continue
            try:
                regions.append(trace_region(child, path, recorded[path], leaf_policy))
            except Exception as error:  # noqa: BLE001
                failures.append((path, _reason(error)))
                descend(child, path)

    descend(model, "")
    if not regions:
        where = "; ".join(f"{p or '<model>'}: {r}" for p, r in failures[:4])
        raise CaptureError(f"{type(model).__name__}: no region holding projection layers could be "
                           f"captured with torch.fx ({where}); mark the failing module as a leaf "
                           "(leaf_modules=) or move the FFN into a module of its own.")
    return Capture(regions, failures)
