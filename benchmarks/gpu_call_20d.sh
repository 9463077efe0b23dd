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
python3 benchmarks/show_bench.py --rows $(ls -tr /tmp/c20d/*.json)
tar czf $OUT/c20d.tar.gz -C /tmp c20d
