"""Leaf policy: which modules stay one `call_module` node in the captured graph.

FFN building blocks (every `nn.Linear` subclass, HF `Conv1D`, activation and dropout modules)
must be leaves so the patterns see clean nodes. Attention, rotary and embedding modules, norms
and mask builders are leaves too: they never hold an FFN and their code is what breaks tracing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

# Class names of modules that are leaves whatever their library.
_OPAQUE = re.compile(
    r"(Attention|Attn|RotaryEmbedding|Embeddings?|LayerNorm|RMSNorm|GroupNorm|BatchNorm\dd|"
    r"DropPath)$"
)
_PROJECTION_CLASSES = ("Conv1D",)  # transformers.pytorch_utils.Conv1D (GPT-2): weight [in, out]


def is_projection_module(module: nn.Module) -> bool:
    """nn.Linear and its subclasses (FalconLinear, ...), and HF's transposed Conv1D."""
    return isinstance(module, nn.Linear) or (
        type(module).__name__ in _PROJECTION_CLASSES and hasattr(module, "nf")
    )


def is_activation_module(module: nn.Module) -> bool:
    from ..patterns.vocabulary import activation_of_module

    return activation_of_module(module) is not None


_NORM = re.compile(r"(LayerNorm|RMSNorm|GroupNorm|BatchNorm\dd)$")


def _norm_holding_matrices(module: nn.Module) -> bool:
    """Named like a norm but holding a weight matrix, so more than a norm (SqueezeBERT's
    ConvDropoutLayerNorm: a projection, dropout, residual and norm): traced through."""
    return bool(_NORM.search(type(module).__name__)) and any(p.dim() >= 2 for p in module.parameters())


@dataclass(frozen=True)
class LeafPolicy:
    """Extra leaves can be named by class or by qualified name (a hint when tracing fails)."""

    leaf_classes: tuple[type, ...] = ()
    leaf_names: tuple[str, ...] = ()
    opaque_pattern: re.Pattern = field(default=_OPAQUE)

    def is_leaf(self, module: nn.Module, qualname: str) -> bool:
        from ..moe import MoE

        if isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
        return (
            isinstance(module, MoE)
            or is_projection_module(module)
            or is_activation_module(module)
            or isinstance(module, (nn.Dropout, nn.Identity))
            or isinstance(module, self.leaf_classes)
            or qualname in self.leaf_names
            or (bool(self.opaque_pattern.search(type(module).__name__)) and not _norm_holding_matrices(module))
            or type(module).__module__.startswith("torch.nn")
        )
