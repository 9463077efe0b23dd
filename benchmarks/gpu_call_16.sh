#!/usr/bin/env bash
# Queued (BENCHMARKS.md "Not yet measured"), on a 2x H200 host; carry .whl-min and
# .gpudata/cpp-125m: nam-1b for 300 steps in bf16 beside the same with FP8 (tensorwise
# dense GEMMs, rowwise grouped experts), then both compared (losses, val bits/byte,
# tokens/s, the cards' clocks over the counted steps).
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 570 --out $OUT/jobs.tar.gz \
  --only curve_1b_bf16_16 curve_1b_fp8_16
python3 benchmarks/compare_train_losses.py /tmp/gpu-jobs/c1b-bf16 /tmp/gpu-jobs/c1b-fp8 --steps 0,49,99,149,199,249,299 \
  | tee /tmp/gpu-jobs/curve_1b.txt
python3 -m megacpp compare /tmp/gpu-jobs/c1b-bf16 /tmp/gpu-jobs/c1b-fp8 2>&1 | tail -22 | tee -a /tmp/gpu-jobs/curve_1b.txt
