#!/usr/bin/env bash
# Create .venv and install megacpp with its test extras. Idempotent.
# torch is pinned to 2.13.0: on the project's CPU machines that release lies
# on disk as a CPU build, so no multi-GB CUDA download happens.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -c "import megacpp, torch; print(f'megacpp {megacpp.__version__}, torch {torch.__version__}')"
