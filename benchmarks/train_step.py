"""End-to-end training step: a 12-layer d=768 Llama-style model, dense vs upcycled.

    python benchmarks/train_step.py --out train.json     # CUDA, bf16
    python benchmarks/train_step.py --smoke              # CPU, tiny (CI)

The upcycled model converts every other MLP to 8 experts, top-2 (upcycle_fx.rewrite). Both
train with AdamW on random tokens (batch × seq fixed); we report tokens/s and model FLOPs
utilisation: (6 · active non-embedding parameters + 12 · layers · d · seq) FLOPs per token
(PaLM's formula, attention included) over the GPU's peak dense bf16 rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import upcycle_fx  # noqa: E402
from upcycle_fx.report import active_parameters  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak (SXM datasheet)


def build(layers: int, d: int, d_ff: int, vocab: int, heads: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=d_ff,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads, max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def flops_per_token(model, layers: int, d: int, seq: int) -> float:
    embedding = model.get_input_embeddings().weight.numel()
    return 6 * (active_parameters(model) - embedding) + 12 * layers * d * seq


def time_steps(model, batch: int, seq: int, vocab: int, steps: int, device) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    ids = torch.randint(0, vocab, (batch, seq), device=device)

    def step():
        loss = model(input_ids=ids, labels=ids).loss  # holds the aux losses in training mode
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    layers, d, d_ff, vocab, heads = (12, 768, 3072, 32000, 12) if not args.smoke else (4, 64, 160, 256, 4)
    batch, seq, steps = (args.batch, args.seq, args.steps) if not args.smoke else (2, 32, 2)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dense = build(layers, d, d_ff, vocab, heads)
    upcycled = upcycle_fx.rewrite(dense, num_experts=8, top_k=2, seed=0)
    peak = next((v for k, v in PEAK_BF16.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    rows = []
    for name, model in (("dense", dense), ("upcycled E=8 k=2", upcycled)):
        model = model.to(device=device, dtype=dtype).train()
        seconds = time_steps(model, batch, seq, vocab, steps, device)
        tokens_per_s = batch * seq / seconds
        fpt = flops_per_token(model, layers, d, seq)
        row = {"model": name, "params": upcycle_fx.report.count_parameters(model),
               "active_params": active_parameters(model), "step_ms": seconds * 1e3,
               "tokens_per_s": tokens_per_s, "flops_per_token": fpt,
               "mfu": fpt * tokens_per_s / peak if peak else None}
        rows.append(row)
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "-"
        print(f"{name:18s} params={row['params']:,} active={row['active_params']:,.0f} "
              f"step={row['step_ms']:.1f} ms tokens/s={tokens_per_s:,.0f} MFU={mfu}")
        model.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "batch": batch, "seq": seq,
            "layers": layers, "d_model": d, "d_ff": d_ff, "vocab": vocab, "dtype": str(dtype),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
