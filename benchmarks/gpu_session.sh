#!/usr/bin/env bash
# Shared setup for runs on the lent GPU machine: wheels carried in .whl/
# (liger-kernel, tomli-w, pytest) installed to /tmp/site; src/ on the path.
# Usage: source benchmarks/gpu_session.sh
export PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests/model:$PWD/tests/ops
# .whl unless WHL names another folder; a call that carried only .whl-min
# gets .whl-min (twice a call was lost to sourcing this without WHL=.whl-min)
if [ -z "$WHL" ]; then
  if [ -d .whl ]; then WHL=.whl; elif [ -d .whl-min ]; then WHL=.whl-min; else WHL=.whl; fi
fi
# The marker names the wheel set: a later call on the same warm machine with
# another folder (.whl after .whl-min) must install, not find an old marker.
MARK=/tmp/site/.done-$(ls "$WHL" 2>/dev/null | md5sum | cut -c1-12)
# A marker without the packages behind it has been seen (2026-11-28: tomli_w
# missing on a fresh 1-GPU machine): check an import, not only the marker.
if [ -f "$MARK" ] && ! PYTHONPATH=/tmp/site python3 -c "import tomli_w" 2>/dev/null; then
  echo "gpu_session: $MARK present but tomli_w not importable: reinstalling" >&2
  rm -f "$MARK"
fi
if [ -d "$WHL" ] && [ ! -f "$MARK" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && touch "$MARK"
fi
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
