#!/usr/bin/env bash
# One-shot, idempotent environment set-up used by both README commands and by CI.
# Creates .venv (if missing), installs the CPU build of torch where there is no CUDA
# (a plain `torch` requirement would pull a multi-GB CUDA build), then the package with its
# dependencies, the test/bench tools and the optional integrations (trl, peft, wandb,
# tensorboard) that the tests exercise. Re-running it is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        python -m pip install -q "torch>=2.5"
    else
        # CPU wheel (lies on disk on the project's machines; from the PyTorch CPU index elsewhere)
        python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
    fi
fi
python -m pip install -q -e ".[dev,test,bench,integrations]" 2>&1 | grep -v "is ignored" || true
python -c "import drorebel, torch, triton; print(f'drorebel {drorebel.__version__} | torch {torch.__version__} | triton {triton.__version__}')"
