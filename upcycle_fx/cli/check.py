"""Pass/fail bars of the command line's measurements against the dense model.

`rewrite --out` checks what it wrote with `exporters.written_check.check_written`: one converted
FFN at a time read back from the shards and run in float32 beside the dense one, so its bar is
1e-5 relative whatever the storage dtype, and its memory stays near one layer.

`rewrite` without `--out` runs the whole dense and upcycled models in the weights' own dtype.
Tolerance there: 1e-5 relative in float32 (DESIGN §8). In half precision the upcycled model rounds
in other places than the dense one (each expert's output and the weighted sum of the k experts
are rounded to the dtype before the residual add), so the two differ by a few units of rounding
at the output; measured on the real all-MiniLM-L6-v2 (6 layers, 3 seeds): up to 6.1e-3 in
bfloat16 (0.8 machine epsilon, 2^-7) and 8.5e-4 in float16 (0.9 epsilon, 2^-10). The threshold
is 4 machine epsilons, 3.1e-2 for bfloat16 and 3.9e-3 for float16: 4.5x margin over what was
measured, well below the 1e-1 and more a wrongly rewritten FFN gives.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .display import step

HALF_PRECISION_EPSILONS = 4


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error of a function-preserving conversion run with weights in `dtype`."""
    if dtype in (torch.float32, torch.float64):
        return 1e-5
    return HALF_PRECISION_EPSILONS * torch.finfo(dtype).eps


def check_written_model(source: Path, written: Path, format: str, *, device: str = "cpu"):
    """The written model against the dense one in `source`, layer by layer in bounded memory
    (a `WrittenCheck`: `.max_relative_error`, `.tolerance`, `.layers_checked`, ...)."""
    from ..exporters.written_check import check_written

    with step("checking the written model against the dense one, layer by layer"):
        return check_written(source, written, format, device=device)
