#!/usr/bin/env bash
# Seventeenth session, fourth call, on a 2x H200 host (carry .whl-min): the nam-1b-fp8
# preset's step on two cards (jobs preset_1bfp8_a/b in benchmarks/gpu_jobs.txt).
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 250 --out $OUT/jobs.tar.gz \
  --only preset_1bfp8_a preset_1bfp8_b
for f in /tmp/gpu-jobs/preset_*.json; do
  [ -s "$f" ] && echo "$f" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 1,5p
done
