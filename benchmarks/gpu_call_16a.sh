#!/usr/bin/env bash
# Sixteenth session, first call (2x H200; carry .whl-min and .gpudata/cpp-125m): the
# experts' grouped GEMMs in FP8 — CUDA tests, micro-benchmark, nam-1b's step, 40 training steps.
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 575 --out $OUT/jobs.tar.gz \
  --only fp8x_bench_16 fp8x_train_16
grep -E "passed|failed|error" /tmp/gpu-jobs/fp8x_bench_16.log | tail -3
grep -A12 "^GEMM" /tmp/gpu-jobs/fp8x_bench_16.log
for f in /tmp/gpu-jobs/bench_*_16*.json; do
  [ -f "$f" ] && echo "$f" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 1,4p
done
cat /tmp/gpu-jobs/train_fp8x.txt 2>/dev/null | tail -12
tail -5 /tmp/gpu-jobs/fp8x_train_16.log
