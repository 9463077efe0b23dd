#!/usr/bin/env bash
# Nineteenth session, call 3 (one H200; carry .whl-min): where the FP8 expert weight gradient's
# time goes — the grouped-GEMM micro-benchmark (now compiled past dynamo's recompile limit) and
# one profiled nam-1b-fp8 step with it. Outputs in one archive.
source benchmarks/gpu_session.sh
J=/tmp/c19c; mkdir -p $J
timeout 150 python3 -m megacpp bench --recipe nam-1b-fp8 --steps 3 --warmup 2 --no-family-times --top-kernels 30 --accum 0 \
  --set policy.precision.expert_low_precision=fp8_rowwise_wgrad > $J/wg_prof.txt 2>&1
sed -n 1,45p $J/wg_prof.txt | cut -c1-160
timeout 200 python3 benchmarks/fp8_grouped_bench.py --json $J/fp8_grouped.json > $J/fp8_grouped.log 2>&1
grep -v Warning $J/fp8_grouped.log | grep -v '^ *"""' | tail -24
tar czf $OUT/c19c.tar.gz -C /tmp c19c
