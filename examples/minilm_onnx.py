"""Upcycle the real all-MiniLM-L6-v2, export it to ONNX, and embed sentences with onnxruntime.

    python examples/minilm_onnx.py [--out-dir DIR] [--experts 4] [--top-k 2] [--portable]
                                   [--target cpu|cuda] [--noise 0.01]

Every other FFN becomes an MoE layer (router N(0, 1) and experts perturbed with `--noise`, so
the routing matters); the model goes to ONNX with `upcycle_fx.export_onnx` and runs in
onnxruntime. Sentence embeddings are computed as sentence-transformers does for this checkpoint
(mean over the attention mask, then L2 normalisation) from PyTorch's and onnxruntime's outputs,
on two batches of different sizes and lengths, and compared. Exit code 1 if the relative error
exceeds 1e-4.

MiniLM's FFNs use the exact (erf) GELU. onnxruntime's CPU MoE kernel computes the tanh
approximation, so for `--target cpu` the exporter keeps these layers portable and says so; with
`--target cuda` they become fused com.microsoft::MoE nodes (which then need the CUDA EP to run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

import upcycle_fx
from upcycle_fx.testing.zoo import load_minilm

TOLERANCE = 1e-4
BATCHES = (
    ["Sparse upcycling turns a dense checkpoint into a mixture of experts.",
     "The quick brown fox jumps over the lazy dog."],
    ["ONNX Runtime has a fused mixture-of-experts operator.",
     "Every other feed-forward block becomes a router with experts.",
     "Short one.",
     "A somewhat longer sentence, so that the padded batch has more tokens than the first one did."],
)


def sentence_embeddings(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """all-MiniLM-L6-v2's pooling: mean over real tokens, then L2 normalisation."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    pooled = (token_embeddings * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def run(out_dir: str, *, experts: int = 4, top_k: int = 2, fused: bool = True, target: str = "cpu",
        noise: float = 0.01, seed: int = 0) -> dict:
    """Upcycle, export and compare; returns the numbers (also used by tests/test_onnx_minilm.py)."""
    import onnxruntime

    dense, tokenizer = load_minilm()
    model = upcycle_fx.rewrite(dense, num_experts=experts, top_k=top_k, router_init_std=1.0,
                               expert_noise_std=noise, seed=seed).eval()
    example = tokenizer(BATCHES[0], padding=True, return_tensors="pt")
    start = time.perf_counter()
    path = upcycle_fx.export_onnx(model, f"{out_dir}/minilm-moe.onnx", fused=fused, target=target,
                                  kwargs={"input_ids": example["input_ids"],
                                          "attention_mask": example["attention_mask"]})
    export_seconds = time.perf_counter() - start
    result = {"path": str(path), "report": path.report, "export_seconds": export_seconds, "errors": []}
    if target != "cpu":
        return result   # the file needs the CUDA execution provider to run
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for sentences in BATCHES:
        batch = tokenizer(sentences, padding=True, return_tensors="pt")
        feeds = {"input_ids": batch["input_ids"].numpy(), "attention_mask": batch["attention_mask"].numpy()}
        with torch.no_grad():
            expected = sentence_embeddings(model(**batch).last_hidden_state, batch["attention_mask"])
            dense_embeddings = sentence_embeddings(dense(**batch).last_hidden_state, batch["attention_mask"])
        got = sentence_embeddings(torch.from_numpy(session.run(None, feeds)[0]), batch["attention_mask"])
        result["errors"].append({
            "shape": tuple(batch["input_ids"].shape),
            "relative_error": relative_error(got, expected),
            "cosine_to_dense": float(torch.nn.functional.cosine_similarity(got, dense_embeddings).min()),
        })
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", default=None, help="where to write the .onnx (default: a temp dir)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--portable", action="store_true", help="no fused nodes (fused=False)")
    parser.add_argument("--target", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--noise", type=float, default=0.01, help="expert_noise_std")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        result = run(args.out_dir or scratch, experts=args.experts, top_k=args.top_k,
                     fused=not args.portable, target=args.target, noise=args.noise)
        print(result["report"])
        print(f"export: {result['export_seconds']:.1f} s")
        for row in result["errors"]:
            print(f"batch x seq {row['shape']}: sentence embeddings, onnxruntime vs PyTorch relative "
                  f"error {row['relative_error']:.2e}; min cosine to the dense model {row['cosine_to_dense']:.5f}")
    worst = max((row["relative_error"] for row in result["errors"]), default=0.0)
    if worst > TOLERANCE:
        print(f"FAIL: relative error {worst:.2e} > {TOLERANCE:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
