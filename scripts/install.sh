#!/usr/bin/env bash
# Creates .venv and installs ehr-worker with its training and test extras.
# torch goes first, pinned, so that pip takes the CPU build and nothing later pulls CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[train,dev,ops]"
echo "installed: $(.venv/bin/python -c 'import torch, onnxruntime, celery; print("torch", torch.__version__, "| onnxruntime", onnxruntime.__version__, "| celery", celery.__version__)')"
