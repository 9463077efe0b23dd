#!/usr/bin/env bash
# Thirteenth session (BENCHMARKS.md "Not yet measured"), on a 2x H200 host; carry .whl and
# .gpudata/cpp-125m. `bash benchmarks/gpu_call_13.sh a` first (scope "model" as one graph
# beside inductor's kernel tuning), then `... b` (the trainer's profile beside nam-1b with the
# swept delta-rule launches, then the per-family profile): the two longest jobs of each call
# side by side, one card each.
source benchmarks/gpu_session.sh
case "${1:-a}" in
  a) JOBS="scope_13 tune_kernels_13" ;;
  b) JOBS="train_profile_13 nam1b_13 fam_13" ;;
  *) echo "usage: gpu_call_13.sh a|b" >&2; exit 2 ;;
esac
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 570 --out $OUT/jobs.tar.gz --only $JOBS
for f in /tmp/gpu-jobs/*.json; do python3 benchmarks/show_bench.py $f 2>/dev/null | sed -n 1,3p; done
tail -3 /tmp/gpu-jobs/scope_13.log 2>/dev/null; cat /tmp/gpu-jobs/tune_time.txt 2>/dev/null
head -8 /tmp/gpu-jobs/profile.txt 2>/dev/null
