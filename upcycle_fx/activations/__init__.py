"""FFN activations: named ones as records in one registry, unnamed ones recognised by behaviour.

    import upcycle_fx
    from upcycle_fx.activations import Activation, OnnxForm, add_activation

    add_activation(Activation("my_act", reference=my_act, modules=("MyAct",), onnx=OnnxForm("relu")))
"""

from .records import (Activation, OnnxForm, Spelling, activation_names, add_activation, describe,
                      get_activation, is_ffn_activation, remove_activation, spelled, triton_form)
from . import builtin  # noqa: F401  (registers the built-in records)
from .builtin import QUICK_GELU_ALPHA
from .elementwise import elementwise_problem

__all__ = ["Activation", "OnnxForm", "Spelling", "spelled", "add_activation", "remove_activation",
           "get_activation", "activation_names", "describe", "is_ffn_activation", "triton_form",
           "elementwise_problem", "QUICK_GELU_ALPHA"]
