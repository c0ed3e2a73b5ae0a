"""FFN patterns, one family per file, registered in matching order (most specific first)."""

from . import fused_gated, gated, dense, pointwise_conv, hidden_norm, mixing_conv  # noqa: F401  (registration order = matching order)
from .base import FFNPattern, FFNSite, MatchResult
from .registry import PATTERNS, register_pattern
from .view import PatternView, build_view
from .vocabulary import FFN_ACTIVATIONS, register_activation

__all__ = ["PATTERNS", "register_pattern", "FFNPattern", "FFNSite", "MatchResult", "PatternView",
           "build_view", "FFN_ACTIVATIONS", "register_activation"]
