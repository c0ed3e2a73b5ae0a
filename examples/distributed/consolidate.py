"""A sharded training checkpoint back in one process: check it, then write a native checkpoint.

    python examples/distributed/consolidate.py CKPT --expected CKPT_PARENT/checkpoint_expected.json \
        --native OUT/native [--out OUT/consolidate.json]

`upcycle_fx.distributed.consolidate` rebuilds the upcycled model from the manifest and the DCP
shards (written by 2 GPUs); this script evaluates it on the validation batch the distributed
run evaluated (float32, no TF32, on a GPU if there is one) and compares the loss with the one the
distributed run recorded, then `upcycle_fx.save`s it and loads that back (logits must be equal).
"""

from __future__ import annotations

import _bootstrap  # noqa: F401

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import upcycle_fx
from upcycle_fx import distributed as ud
from upcycling import data
from upcycling.model import ModelSpec

from dist_common import set_fp32_exact, write_json


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--expected", type=Path, required=True)
    parser.add_argument("--native", type=Path, default=None, help="where to upcycle_fx.save it (default: temp)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    expected = json.loads(args.expected.read_text())
    spec = ModelSpec(**expected["spec"])
    corpus = data.load_corpus(data.DataConfig(**expected["data"]))
    x, y = data.validation_batches(corpus.val, 1, expected["batch"], spec.seq, "cpu")[0]

    model = ud.consolidate(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    set_fp32_exact(True)
    model.to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=x.to(device), use_cache=False).logits
        loss = float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1)))
    error = abs(loss - expected["val_loss"]) / abs(expected["val_loss"])

    model.cpu()
    with tempfile.TemporaryDirectory() as scratch:
        native = args.native or Path(scratch) / "native"
        upcycle_fx.save(model, native, overwrite=True)
        again = upcycle_fx.load(native)
        with torch.no_grad():
            probe = x[:1, :64]
            same = torch.equal(again(input_ids=probe).logits, model(input_ids=probe).logits)
    result = {"checkpoint": str(args.checkpoint), "model": type(model).__name__,
              "params": upcycle_fx.report.count_parameters(model), "moe_layers": len(upcycle_fx.moe_layers(model)),
              "val_loss_single_process": loss, "val_loss_distributed": expected["val_loss"],
              "relative_error": error, "tolerance": expected["tolerance"], "native_roundtrip_equal": same,
              "native": str(args.native) if args.native else None,
              "passed": bool(error <= expected["tolerance"] and same)}
    print(f"consolidated {result['model']} ({result['params']:,} parameters, {result['moe_layers']} MoE layers): "
          f"val loss {loss:.6f} in one process vs {expected['val_loss']:.6f} on the ranks "
          f"(relative error {error:.1e}, tolerance {expected['tolerance']:.0e}); "
          f"upcycle_fx.save/load round trip {'equal' if same else 'DIFFERENT'}", flush=True)
    if args.out:
        write_json(args.out, result)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
