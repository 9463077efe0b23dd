#!/usr/bin/env bash
# The eleventh session's second GPU call (4x H200; carry .whl and .gpudata/cpp-125m):
# the all-M pair alone on the host first (mamba_ssm's step is host-bound), then the
# other jobs side by side until ~565 s after the start; one archive of both job dirs.
source benchmarks/gpu_session.sh
T0=$SECONDS
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --gpus 1 --deadline 280 --jobdir /tmp/gj-alone \
  --only peer_mamba_final
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline $((565 - (SECONDS - T0))) --jobdir /tmp/gj-side \
  --only peer_llama_11 auto_125m_11 nam1b_11 train_auto_11 gn_tests_11 gnorm_11
tar czf "$OUT/jobs.tar.gz" -C /tmp gj-alone gj-side
