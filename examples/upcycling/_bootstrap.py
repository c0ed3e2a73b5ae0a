"""Script-mode imports: `python examples/upcycling/compare.py` puts this folder on sys.path.

Importing this module makes `upcycling` (this folder, as a package) and `upcycle_fx` (the repo)
importable instead, and takes this folder itself off sys.path so that its module names (data,
model, plots, ...) cannot shadow installed packages. Package-mode imports never need it.
"""

from __future__ import annotations

import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != _HERE]
for _path in (str(_HERE.parents[1]), str(_HERE.parent)):  # repo root, then examples/
    if _path not in sys.path:
        sys.path.insert(0, _path)
