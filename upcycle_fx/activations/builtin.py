"""The built-in activation records: the activations of torch.nn, transformers and timm FFNs."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .records import Activation, OnnxForm, add_activation, spelled

QUICK_GELU_ALPHA = 1.702   # x · sigmoid(1.702 x), CLIP's "quick GELU"
_TRITON = "upcycle_fx.activations.triton_forms:"


def _gelu_tanh(t):
    return F.gelu(t, approximate="tanh")


def _relu2(t):
    return torch.relu(t).square()


def _gelu_quick(t):
    return t * torch.sigmoid(QUICK_GELU_ALPHA * t)


BUILTIN = (
    Activation("relu", torch.relu, modules=("ReLU",), calls=(F.relu, torch.relu, "relu"),
               triton=_TRITON + "relu", onnx=OnnxForm("relu")),
    Activation("square", torch.square,
               calls=(torch.square, "square", spelled(operator.pow, 2), spelled(torch.pow, 2), spelled("pow", 2)),
               triton=_TRITON + "square"),
    Activation("relu2", _relu2, modules=("ReLUSquaredActivation", "SquaredReLU"), chain=("relu", "square"),
               triton=_TRITON + "relu2"),
    Activation("silu", F.silu, modules=("SiLU", "Swish", "SiLUActivation"), calls=(F.silu,),
               triton=_TRITON + "silu", onnx=OnnxForm("silu", swiglu_alpha=1.0)),
    Activation("sigmoid", torch.sigmoid, modules=("Sigmoid",), calls=(torch.sigmoid, F.sigmoid, "sigmoid"),
               triton=_TRITON + "sigmoid"),
    Activation("tanh", torch.tanh, modules=("Tanh",), calls=(torch.tanh, F.tanh, "tanh"),
               triton=_TRITON + "tanh", ffn=False),
    Activation("gelu", F.gelu, modules=("GELU", "GELUActivation"), calls=(F.gelu,),
               triton=_TRITON + "gelu", onnx=OnnxForm("gelu", gelu="erf")),
    Activation("gelu_tanh", _gelu_tanh,
               modules=(spelled("GELU", approximate="tanh"), spelled("GELUActivation", approximate="tanh"),
                        "NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh",
                        "AccurateGELUActivation"),
               calls=(spelled(F.gelu, approximate="tanh"),),
               triton=_TRITON + "gelu_tanh", onnx=OnnxForm("gelu", gelu="tanh")),
    Activation("gelu_fast", _gelu_tanh, modules=("FastGELUActivation",),   # the gelu_tanh formula
               triton=_TRITON + "gelu_tanh", onnx=OnnxForm("gelu", gelu="tanh")),
    Activation("gelu_quick", _gelu_quick, modules=("QuickGELUActivation", "QuickGELU"),
               triton=_TRITON + "gelu_quick", onnx=OnnxForm(swiglu_alpha=QUICK_GELU_ALPHA)),
    Activation("mish", F.mish, modules=("Mish", "MishActivation"), calls=(F.mish,)),
    Activation("relu6", F.relu6, modules=("ReLU6",), calls=(F.relu6,)),
    Activation("leaky_relu", F.leaky_relu, modules=("LeakyReLU",), calls=(F.leaky_relu,)),
    Activation("hardswish", F.hardswish, modules=("Hardswish",), calls=(F.hardswish,)),
)

for _record in BUILTIN:
    add_activation(_record)
