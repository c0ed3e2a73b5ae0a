"""What each onnxruntime target accepts: the facts the per-layer decision and the file format use.

One table, so that a fact measured later (DESIGN §6; `benchmarks/onnx_gpu.py` checks the CUDA
entries on a GPU) is corrected in one place.

* File format: onnxruntime 1.31 reads ONNX IR versions up to 13 and onnx 1.23 writes 14 by
  default, so the IR version is set explicitly: IR 10 with opset 18 (exported files were run in
  onnxruntime 1.23.2, 1.28.0 and 1.32.0; the `MoE` contrib op is `com.microsoft` version 1 in
  all of them).
* `cpu` (onnxruntime >= 1.23): the MoE kernel is float32 only (float16 runs through inserted
  Casts, bfloat16 does not run), has no fc3 input, accepts SwiGLU only interleaved
  (`swiglu_fusion=1`), and its GELU is the tanh approximation (measured, research/anchors-onnx.md
  §1.4).
* `cuda` (onnxruntime >= 1.28: earlier CUDA kernels ignored the SwiGLU attributes and computed
  GPT-OSS SwiGLU, onnxruntime issue #28738): float32 / float16 / bfloat16; hidden and inner sizes
  >= 16 and 128-bit aligned; its GELU is the tanh approximation too (measured with
  onnxruntime-gpu 1.31.1 on an H100 by `benchmarks/onnx_gpu.py`'s probe: 6.3e-7 from tanh GELU,
  7.5e-5 from erf GELU; TensorRT-LLM's source had suggested erf).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import OnnxExportError

IR_VERSION = 10
OPSET = 18
MSFT_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class Target:
    """One onnxruntime execution provider the fused MoE node is meant to run on."""

    name: str
    providers: tuple[str, ...]
    min_onnxruntime: tuple[int, int]
    gelu: str                                  # "tanh" or "erf": what the kernel's "gelu" computes
    dtypes: tuple[torch.dtype, ...]            # expert dtypes the kernel runs
    min_dim: int = 1                           # smallest hidden / inner size
    align_bytes: int = 1                       # hidden and inner sizes in bytes must divide by it

    def dim_problem(self, d_model: int, d_ff: int, dtype: torch.dtype) -> str | None:
        """Why the kernel cannot take these sizes, or None."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        for label, size in (("d_model", d_model), ("d_ff", d_ff)):
            if size < self.min_dim or size * itemsize % self.align_bytes:
                return (f"{label}={size} in {dtype}: the {self.name} kernel needs sizes >= "
                        f"{self.min_dim} and {self.align_bytes}-byte aligned")
        return None


TARGETS: dict[str, Target] = {
    "cpu": Target("cpu", ("CPUExecutionProvider",), (1, 23), gelu="tanh",
                  dtypes=(torch.float32, torch.float16)),
    "cuda": Target("cuda", ("CUDAExecutionProvider", "CPUExecutionProvider"), (1, 28), gelu="tanh",
                   dtypes=(torch.float32, torch.float16, torch.bfloat16), min_dim=16, align_bytes=16),
}


def get_target(name: str) -> Target:
    """The Target called `name`, or a named error listing the known ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise OnnxExportError(f"target={name!r} is unknown; choose one of {tuple(TARGETS)} (the "
                              "onnxruntime execution provider the fused MoE nodes will run on)") from None


def onnxruntime_version() -> tuple[int, int] | None:
    """(major, minor) of the importable onnxruntime, or None when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    major, minor = onnxruntime.__version__.split(".")[:2]
    return int(major), int(minor)
