#!/usr/bin/env bash
# Fourteenth session (BENCHMARKS.md "Not yet measured"), on a 2x H200 host; carry .whl and
# .gpudata/cpp-125m. `bash benchmarks/gpu_call_14.sh a` first (the MoE weight-gradient
# split beside scope "model" and the delta rule's kept intermediates), then `... b`
# (nam-1b at its recipe's step beside the SSD's chunk size); then, on one H200 alone,
# `... c` (the all-M pair: its peer is host-bound); `... d` (inductor's kernel tuning,
# long compiles) where time is left.
source benchmarks/gpu_session.sh
case "${1:-a}" in
  a) JOBS="moe_wgrad_14 scope_14"; GPUS="" ;;
  b) JOBS="nam1b_14 chunk_14"; GPUS="" ;;
  c) JOBS="peer_mamba_final"; GPUS="--gpus 1" ;;
  d) JOBS="tune_kernels_14"; GPUS="" ;;
  e) JOBS="combo_14 nam1b_combo_14"; GPUS="" ;;
  f) JOBS="peer_mamba_final confirm_125m_14 nam1b_preset_14"; GPUS="--gpus 1" ;;
  *) echo "usage: gpu_call_14.sh a|b|c|d|e|f" >&2; exit 2 ;;
esac
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 570 $GPUS --out $OUT/jobs.tar.gz --only $JOBS
for f in /tmp/gpu-jobs/*.json; do python3 benchmarks/show_bench.py $f 2>/dev/null | sed -n 1,3p; done
tail -12 /tmp/gpu-jobs/moe_wgrad_14.log 2>/dev/null; tail -4 /tmp/gpu-jobs/peer_mamba_final.log 2>/dev/null; cat /tmp/gpu-jobs/tune_time.txt 2>/dev/null
