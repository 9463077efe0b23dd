#!/usr/bin/env bash
# Queued for the nineteenth session (BENCHMARKS.md "Not yet measured" 1), on a 2x H200 host
# (carry .whl-min): the experts' weight gradient in FP8 — CUDA tests, micro-benchmark, and
# nam-1b-fp8 with and without it, alternating, on two cards (jobs fp8wgrad_19a/b); gradsum_19
# (nam-125m's foreach gradient sum against autograd's) on a third card where there is one. On a
# one-GPU machine: `--only fp8wgrad_19a` alone. A training pair follows only if the FP8 weight
# gradient is faster.
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 560 --out $OUT/jobs.tar.gz --only fp8wgrad_19a fp8wgrad_19b gradsum_19
for f in /tmp/gpu-jobs/wg_*.json /tmp/gpu-jobs/gs_*.json; do
  [ -s "$f" ] && printf "%s " "$(basename $f)" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p
done
