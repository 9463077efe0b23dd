#!/usr/bin/env bash
# Twentieth session, call 4 (one H200; carry .whl-min): nam-1b-fp8 with the bf16 residual stream,
# alternating with the preset (its FP8-converted in_proj keeps one GEMM, so the split is not asked).
source benchmarks/gpu_session.sh
J=/tmp/c20d; mkdir -p $J
B="python3 -m megacpp bench --recipe nam-1b-fp8 --steps 4 --warmup 2 --no-family-times --no-kernels --accum 0 --json"
for round in 1 2; do
  timeout 100 $B > $J/p$round.json 2> $J/p$round.err
  timeout 100 $B --set policy.precision.residual=compute > $J/r$round.json 2> $J/r$round.err
done
python3 - <<'PY'
import json, glob, os
for f in sorted(glob.glob("/tmp/c20d/*.json"), key=os.path.getmtime):
    try:
        d = json.load(open(f))
    except Exception as e:
        print(f, "no result", e); continue
    c = d.get("clocks", {})
    print(f"{os.path.basename(f):8} {d['tokens_per_s']:>9,.0f} tok/s  MFU {d['mfu']*100:5.1f}%  peak {d['peak_memory_gib']:.2f} GiB  SM {c.get('sm_mhz_median')}  {d['precision']}")
PY
tar czf $OUT/c20d.tar.gz -C /tmp c20d
