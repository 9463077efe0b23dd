#!/usr/bin/env bash
# Twelfth session, second call (2x H200; carry .whl, .gpudata/cpp-125m).
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 560 --out $OUT/jobs.tar.gz \
  --only ab_12 tests_12 scope_fix_12 fam_12b
tail -5 /tmp/gpu-jobs/tests_12.log; cat /tmp/gpu-jobs/scope_fix_12.log | grep -v Warning | tail -8
for f in /tmp/gpu-jobs/bench_*.json; do python3 benchmarks/show_bench.py $f 2>/dev/null | sed -n 1,3p; done
