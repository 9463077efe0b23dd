#!/usr/bin/env bash
# Twelfth session, first call (2x H200; carry .whl, .gpudata/cpp-125m): the queued
# measurements (BENCHMARKS.md "Not yet measured" 1, 2, 4) and the per-family profile.
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 555 --out $OUT/jobs.tar.gz \
  --only auto_accum_12 bench_fam_12 mamba_accum_12 scope_debug_12 llama24_12 train_mamba_accum_12
for f in /tmp/gpu-jobs/*/*.json; do echo "== $f"; python3 benchmarks/show_bench.py $f 2>/dev/null | sed -n 1,4p; done
