#!/usr/bin/env bash
# Fifteenth session (BENCHMARKS.md "Not yet measured"), on a 2x H200 host; carry .whl.
# `bash benchmarks/gpu_call_15.sh a` (the GEMM layouts and the K-major expert forward beside
# the Triton SwiGLU), then `... b` (nam-1b with FP8 beside inductor's kernel tuning at nam-125m).
source benchmarks/gpu_session.sh
case "${1:-a}" in
  a) JOBS="gemm_layout_15 swiglu_15" ;;
  b) JOBS="fp8_nam1b_15 tune_kernels_14" ;;
  *) echo "usage: gpu_call_15.sh a|b" >&2; exit 2 ;;
esac
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 570 --out $OUT/jobs.tar.gz --only $JOBS
for f in /tmp/gpu-jobs/bench_*_15.json /tmp/gpu-jobs/bench_nam125m*_14.json; do
  [ -f "$f" ] && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 1,3p
done
tail -14 /tmp/gpu-jobs/gemm_layout_15.log 2>/dev/null; cat /tmp/gpu-jobs/tune_time.txt 2>/dev/null
