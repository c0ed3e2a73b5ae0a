"""Do our stock MoE checkpoints load and compute the same logits in an older transformers?

Writes small upcycled Llama / Qwen3 models with `upcycle_fx.save(format="hf")` as Mixtral,
Qwen2-MoE and Qwen3-MoE (with non-default rope settings, where a missing config field would
fall back to the other version's default), installs the older transformers into a private
folder (`pip install --target`, nothing else on the machine changes), and loads every output
there with `AutoModelForCausalLM.from_pretrained` in a child process that sees that folder
first. Pass: every tensor used (no missing / unexpected keys) and logits within 1e-5 (relative,
float32) of the upcycled model's, computed here with the installed transformers.

    python benchmarks/hf_compat.py                          # transformers==4.57.*
    python benchmarks/hf_compat.py --version "4.57.*" --target /tmp/tf457   # reuse an install

Exit status 0 when every case passes, 1 otherwise, 3 when pip could not install the version.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TOLERANCE = 1e-5  # relative, float32 (the function-preservation bar)

# (name, dense family, config overrides, pattern, expected class)
CASES = [
    ("mixtral", "llama", {"rope_theta": 10000.0}, "all", "MixtralForCausalLM"),
    ("mixtral-linear-rope", "llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0},
                                      "rope_theta": 50000.0}, "all", "MixtralForCausalLM"),
    ("mixtral-sliding", "mistral", {"sliding_window": 4}, "all", "MixtralForCausalLM"),
    ("qwen2_moe", "llama", {}, "every_other_mlp", "Qwen2MoeForCausalLM"),
    ("qwen2_moe-llama3-rope", "llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16},
                                        "rope_theta": 500000.0}, [0, 1, 3], "Qwen2MoeForCausalLM"),
    ("qwen2_moe-from-qwen2", "qwen2", {}, "every_other_mlp", "Qwen2MoeForCausalLM"),
    ("qwen3_moe", "qwen3", {"head_dim": 32}, "every_other_mlp", "Qwen3MoeForCausalLM"),
    ("qwen3_moe-all", "qwen3", {"head_dim": 32, "rope_theta": 1000.0}, "all", "Qwen3MoeForCausalLM"),
]

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}


def write_cases(directory: Path) -> list[dict]:
    """Write every case with the installed transformers; the expected logits go beside it."""
    import warnings

    import torch
    import transformers

    import upcycle_fx
    from upcycle_fx.testing.zoo import _decoder_cfg

    written = []
    ids = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    for name, family, overrides, pattern, architecture in CASES:
        torch.manual_seed(0)
        prefix = FAMILIES[family]
        config = getattr(transformers, f"{prefix}Config")(**_decoder_cfg(**overrides))
        dense = getattr(transformers, f"{prefix}ForCausalLM")(config).eval()
        model = upcycle_fx.rewrite(dense, pattern, num_experts=4, top_k=2, router_init_std=1.0, seed=0).eval()
        out = directory / name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            upcycle_fx.save(model, out, format="hf")
        with torch.no_grad():
            torch.save({"input_ids": ids, "logits": model(input_ids=ids).logits}, out / "expected.pt")
        written.append({"name": name, "directory": str(out), "architecture": architecture})
    return written


_CHILD = r"""
import json, sys, warnings
import torch, transformers
warnings.filterwarnings("ignore")
results = []
for case in json.loads(sys.argv[1]):
    expected = torch.load(case["directory"] + "/expected.pt")
    try:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            case["directory"], local_files_only=True, output_loading_info=True, torch_dtype=torch.float32)
        with torch.no_grad():
            logits = model.eval()(input_ids=expected["input_ids"]).logits
        ref = expected["logits"]
        error = ((logits - ref).norm() / ref.norm()).item()
        results.append({**case, "loaded_as": type(model).__name__, "error": error,
                        "unused": sorted(info["unexpected_keys"]), "missing": sorted(info["missing_keys"]),
                        "mismatched": [str(m) for m in info["mismatched_keys"]]})
    except Exception as e:
        results.append({**case, "loaded_as": None, "error": None, "exception": f"{type(e).__name__}: {e}"})
print(json.dumps({"transformers": transformers.__version__, "results": results}))
"""


def install(version: str, target: Path) -> None:
    """`pip install --target` the requested transformers (and its own dependencies) once."""
    if (target / "transformers").is_dir():
        return
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target), f"transformers=={version}"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


class InstallError(RuntimeError):
    """pip could not install the requested transformers (no index reachable, no such version)."""


def load_in(target: Path, cases: list[dict]) -> dict:
    """Load every case in a child that imports transformers from `target` (torch from here)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the loading child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def passed(result: dict) -> bool:
    return (result.get("error") is not None and result["error"] <= TOLERANCE
            and result["loaded_as"] == result["architecture"]
            and not (result["unused"] or result["missing"] or result["mismatched"]))


def check(version: str, target: Path, workdir: Path) -> dict:
    """Install `version` into `target`, write the cases into `workdir`, load them there."""
    install(version, target)
    report = load_in(target, write_cases(workdir))
    report["passed"] = all(passed(r) for r in report["results"])
    return report


def render(report: dict) -> str:
    import transformers

    lines = [f"written with transformers {transformers.__version__}, loaded with {report['transformers']} "
             f"(tolerance {TOLERANCE:.0e}, float32)",
             "| case | class | relative logits error | keys not used / missing | result |", "|---|---|---:|---|---|"]
    for r in report["results"]:
        error = "-" if r.get("error") is None else f"{r['error']:.1e}"
        keys = r.get("exception") or f"{len(r['unused'])} / {len(r['missing'])}"
        lines.append(f"| {r['name']} | {r['loaded_as']} | {error} | {keys} | {'PASS' if passed(r) else 'FAIL'} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="4.57.*", help="transformers version spec to load with")
    parser.add_argument("--target", type=Path, help="install folder (default: a temporary one, deleted)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hf_compat-") as tmp:
        target = args.target or Path(tmp) / "site"
        try:
            report = check(args.version, target, Path(tmp) / "out")
        except InstallError as error:
            print(error, file=sys.stderr)
            return 3
    print(render(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
