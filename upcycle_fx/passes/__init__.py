"""The passes, in pipeline order: find (analysis), select, upcycle (the rewrite)."""

from .find_mlps import MLPList, MLPMatch, NearMiss, find_mlps
from .select import select_mlps
from .upcycle import FoldedIntoMoE, plan_swap, upcycle_matches

__all__ = ["find_mlps", "MLPMatch", "MLPList", "NearMiss", "select_mlps", "upcycle_matches",
           "plan_swap", "FoldedIntoMoE"]
