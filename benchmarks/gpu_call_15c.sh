#!/usr/bin/env bash
# Fifteenth session, third call (one H200; carry .whl-min and .gpudata/cpp-125m):
# FP8 tensorwise at nam-1b's preset and nam-125m, a 40-step bf16/FP8 training pair on
# nam-1b, and the GEMM layout micro-benchmark with 8-aligned weight-gradient groups.
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 570 --out $OUT/jobs.tar.gz --only fp8_train_15
for f in /tmp/gpu-jobs/bench_*fp8_15.json; do
  [ -f "$f" ] && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 1,6p
done
cat /tmp/gpu-jobs/train_fp8.txt 2>/dev/null; head -30 /tmp/gpu-jobs/compare_fp8.txt 2>/dev/null
tail -16 /tmp/gpu-jobs/fp8_train_15.log 2>/dev/null
