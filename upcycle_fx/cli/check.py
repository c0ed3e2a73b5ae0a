"""The check after `rewrite --out`: the written model, loaded back as its users will, against
the dense model on a real sample input, with a pass/fail threshold that fits the weights' dtype.

Tolerance: 1e-5 relative in float32 (DESIGN §8). In half precision the upcycled model rounds in
other places than the dense one (each expert's output and the weighted sum of the k experts are
rounded to the dtype before the residual add), so the two differ by a few units of rounding at
the output; measured on the real all-MiniLM-L6-v2 (6 layers, 3 seeds): up to 6.1e-3 in bfloat16
(0.8 machine epsilon, 2^-7) and 8.5e-4 in float16 (0.9 epsilon, 2^-10). The threshold is 4
machine epsilons, 3.1e-2 for bfloat16 and 3.9e-3 for float16: 4.5x margin over what was
measured, well below the 1e-1 and more a wrongly rewritten FFN gives.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..report import first_tensor, relative_error
from ..sources import load_pretrained
from .display import step

HALF_PRECISION_EPSILONS = 4
WRITTEN_CHECK_MODULE = "upcycle_fx.exporters.written_check"


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of a function-preserving conversion with weights in `dtype`."""
    if dtype in (torch.float32, torch.float64):
        return 1e-5
    return HALF_PRECISION_EPSILONS * torch.finfo(dtype).eps


def written_dtype(directory: Path) -> torch.dtype:
    """The dtype of most of the floating weights written to `directory` (from shard headers)."""
    from ..exporters.shards import CheckpointReader

    weights: dict[torch.dtype, int] = {}
    for info in CheckpointReader(directory).tensors.values():
        if info.dtype.is_floating_point:
            weights[info.dtype] = weights.get(info.dtype, 0) + info.nbytes
    return max(weights, key=weights.get) if weights else torch.float32


def written_model_error(source: Path, written: Path, format: str, *, device: str = "cpu") -> float:
    """Max relative error of the model written to `written` against the dense one in `source`.

    The one call site of the check: it uses the bounded-memory layer-by-layer check
    (exporters.written_check.written_error) where that module exists, and otherwise loads both
    models whole (`_written_error`)."""
    if importlib.util.find_spec(WRITTEN_CHECK_MODULE) is not None:
        from ..exporters.written_check import written_error

        return written_error(source, written, format, device=device)
    return _written_error(source, written, format, device)


def _written_error(source: Path, written: Path, format: str, device: str) -> float:
    """Load the written model back (as its users will) and measure it against the dense model
    loaded in the written dtype (so that `--dtype` compares like with like)."""
    from .. import exporters

    with step("loading the written model back and measuring its error against the dense model"), \
            torch.no_grad():
        if format == "hf":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(written, dtype="auto", local_files_only=True)
        else:
            model = exporters.load(written)
        dense = load_pretrained(source, dtype=written_dtype(written), device=device)
        expected = first_tensor(dense.sample.call(dense.model))
        return relative_error(first_tensor(dense.sample.call(model.to(device).eval())), expected)
