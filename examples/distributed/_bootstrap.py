"""Script-mode imports: makes `upcycle_fx` (the repo) and `upcycling` (examples/upcycling, whose
model, data and precision helpers these scripts reuse) importable, and forces NVLink multicast
off before torch creates any NCCL communicator (it must stay off on the lent GPU machines)."""

from __future__ import annotations

import os
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
for _path in (str(_HERE.parent), str(_HERE.parents[1])):  # examples/, then the repo root first
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
