"""`export_onnx` with fuzzed arguments and destinations (a few seconds per export, so this family
runs in the command-line campaign only, not in the test suite).

A valid call must write the file and leave the upcycled model untouched; an invalid one must
raise `OnnxExportError` (an `UpcycleError`) before the export runs, and write nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from .models import ModelSpec
from .oracle import Category, Outcome, Snapshot, classify_exception

# argument -> (valid values, invalid values)
ONNX_ARGUMENTS: dict[str, tuple[tuple, tuple]] = {
    "target": (("cpu", "cuda"), ("tpu", None, "CPU")),
    "fused": ((True, False), ("no", None)),
    "portable_layers": (((), ["blocks.0.ffn"]), (["nope"], "blocks.0.ffn", 3)),
    "optimize": ((True,), ("no",)),
    "args": (("right",), ("string", "wrong_last_dim")),
    "destination": (("file",), ("directory", "under_a_file", "existing_directory_name")),
}
STRATA = tuple(ONNX_ARGUMENTS)


@dataclass(frozen=True)
class OnnxCase:
    """`export_onnx(rewrite(spec.build()), destination, **kwargs)` with one argument fuzzed."""

    spec: ModelSpec
    kwargs: dict = field(default_factory=dict)
    args: str = "right"
    destination: str = "file"
    invalid: str | None = None

    @property
    def kind(self) -> str:
        return (self.invalid or "valid").split("=")[0]

    def run(self) -> Outcome:
        import torch

        import upcycle_fx

        model = upcycle_fx.rewrite(self.spec.build(), pattern="all", num_experts=3, seed=0)
        x = self.spec.inputs()
        args = {"right": (x,), "string": ("not a tensor",),
                "wrong_last_dim": (torch.randn(*x.shape[:-1], x.shape[-1] + 3),)}[self.args]
        before = Snapshot.of(model)
        with tempfile.TemporaryDirectory(prefix="upcycle-fx-fuzz-") as tmp:
            root = Path(tmp)
            (root / "file").write_text("not a directory")
            (root / "taken.onnx").mkdir()
            destination = {"file": root / "model.onnx", "directory": root, "under_a_file": root / "file" / "m.onnx",
                           "existing_directory_name": root / "taken.onnx"}[self.destination]
            try:
                upcycle_fx.export_onnx(model, destination, args=args, **self.kwargs)
                written = destination.is_file() and destination.stat().st_size > 0
            except Exception as error:  # noqa: BLE001
                outcome, written = classify_exception(error, "export_onnx"), None
        changed = before.differences(model)
        if changed:
            return Outcome(Category.MUTATED, "export_onnx changed the model: " + "; ".join(changed[:3]))
        if written is None:
            return outcome
        if self.invalid is not None:
            return Outcome(Category.SILENT_WRONG, f"accepted invalid argument {self.invalid}")
        return Outcome(Category.EXACT) if written else Outcome(Category.LOST, "no ONNX file was written")


@st.composite
def onnx_cases(draw, name: str) -> OnnxCase:
    spec = ModelSpec(style=draw(st.sampled_from(("gated", "dense"))), act="silu")
    valid, bad = ONNX_ARGUMENTS[name]
    is_invalid = draw(st.integers(0, 2)) < 2
    value = draw(st.sampled_from(bad if is_invalid else valid))
    invalid = None
    if is_invalid:
        from .repro import source

        invalid = f"{name}={source(value)}"
    if name == "args":
        return OnnxCase(spec, args=value, invalid=invalid)
    if name == "destination":
        return OnnxCase(spec, destination=value, invalid=invalid)
    return OnnxCase(spec, {name: value}, invalid=invalid)
