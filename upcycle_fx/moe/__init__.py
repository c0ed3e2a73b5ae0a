"""The MoE layer: router, stacked experts, routing and the shared dispatch core."""

from .dispatch import dispatch
from .experts import Experts, FFNWeights
from .layer import MoE, MoESettings
from .router import Router
from .routing import Routing, expert_choice_routing, top_k_routing

__all__ = ["MoE", "MoESettings", "Router", "Experts", "FFNWeights", "Routing", "dispatch",
           "top_k_routing", "expert_choice_routing"]
