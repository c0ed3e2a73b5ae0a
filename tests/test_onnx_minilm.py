"""The real all-MiniLM-L6-v2 (issue 3, point 5): upcycled, exported, run in onnxruntime; its
sentence embeddings match PyTorch's. Runs examples/minilm_onnx.py's own code, so the example
cannot rot."""

from __future__ import annotations

import importlib.util
import pathlib

import onnx
import pytest

from onnx_helpers import ONNX_TOLERANCE

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "minilm_onnx.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("minilm_onnx", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_minilm_sentence_embeddings_match_in_onnxruntime(example, tmp_path):
    """Two batches of different size and length; experts perturbed, random router. MiniLM's
    exact GELU keeps every layer portable on the CPU target, and the report says why."""
    result = example.run(str(tmp_path), experts=4, top_k=2, fused=True, target="cpu", noise=0.01)
    shapes = {row["shape"] for row in result["errors"]}
    assert len(shapes) == 2 and len({b for b, _ in shapes}) == 2 and len({s for _, s in shapes}) == 2
    assert max(row["relative_error"] for row in result["errors"]) <= ONNX_TOLERANCE
    # the experts really differ from the dense FFN (so the routing is exercised)
    assert min(row["cosine_to_dense"] for row in result["errors"]) < 0.999
    report = result["report"]
    assert len(report.layers) == 3 and report.fused == []
    assert all("erf GELU" in layer.detail for layer in report.layers)


@pytest.mark.slow
def test_minilm_stays_portable_for_the_cuda_target_too(example, tmp_path, capsys):
    """The CUDA kernel's GELU is the tanh form as well (measured on an H100 with onnxruntime-gpu
    1.31.1), so MiniLM's erf GELU layers stay portable for that target too, with the reason."""
    assert example.main(["--target", "cuda", "--out-dir", str(tmp_path)]) == 0
    assert "0 of 3 MoE layers fused (target cuda)" in capsys.readouterr().out
    nodes = [n for n in onnx.load(str(tmp_path / "minilm-moe.onnx")).graph.node if n.op_type == "MoE"]
    assert nodes == []