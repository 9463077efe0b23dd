#!/usr/bin/env bash
# Shared setup for runs on the lent GPU machine: wheels carried in .whl/
# (liger-kernel, tomli-w, pytest) installed to /tmp/site; src/ on the path.
# Usage: source benchmarks/gpu_session.sh
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests/model:$PWD/tests/ops
WHL=${WHL:-.whl}
if [ -d "$WHL" ] && [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && touch /tmp/site/.done
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
