"""Capture a model (or its smallest traceable regions) as FX graphs for the passes."""

from .inputs import ModelInputs, is_hf_model, resolve_inputs
from .leaves import LeafPolicy, is_projection_module
from .regions import Capture, CapturedRegion, capture
from .tracer import CaptureTracer, ModuleSpan

__all__ = ["capture", "Capture", "CapturedRegion", "CaptureTracer", "ModuleSpan", "LeafPolicy",
           "ModelInputs", "resolve_inputs", "is_hf_model", "is_projection_module"]
