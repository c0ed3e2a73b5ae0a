"""upcycle_fx's own fuzz and fault campaign (needs hypothesis, from the `dev` extra).

    python -m upcycle_fx.testing.fuzz --budget 2000 --seed 0

Families of trials (random FFN models and twists, arguments, numerics, corrupted checkpoints,
disk faults) judged by one oracle (`oracle.py`): exact or a named error, never a silent wrong
model, an unnamed exception, NaN where the dense model is finite, a mutated input or lost data.
The `onnx` family (export_onnx, seconds per trial) runs from the command line only.
"""

from .arguments import ArgumentCase, ConfigCase
from .checkpoints import CheckpointCase
from .disk import DiskFaultCase, LoadArgumentCase, SaveArgumentCase
from .models import ModelSpec
from .numerics import DispatchCase, NumericsCase
from .onnx import OnnxCase
from .oracle import Category, Outcome, Trial
from .rewriting import RaisingPattern, RewriteCase, SelectAll
from .runner import FAMILIES, Campaign, run_campaign

__all__ = ["ArgumentCase", "Campaign", "Category", "CheckpointCase", "ConfigCase", "DiskFaultCase", "DispatchCase",
           "FAMILIES", "LoadArgumentCase", "ModelSpec", "NumericsCase", "OnnxCase", "Outcome", "RaisingPattern",
           "RewriteCase", "SaveArgumentCase", "SelectAll", "Trial", "run_campaign"]
