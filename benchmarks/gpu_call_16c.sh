#!/usr/bin/env bash
# Sixteenth session, third call (2x H200; carry .whl-min): nam-1b at micro 32 with FP8 dense,
# with and without the experts in FP8 under each quantizer; the order reversed on card 1.
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 420 --out $OUT/jobs.tar.gz \
  --only fp8q_ab_16a fp8q_ab_16b
for f in /tmp/gpu-jobs/ab_*.json; do
  [ -s "$f" ] && echo "$f" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 2,3p
  [ -s "$f" ] && python3 benchmarks/show_bench.py "$f" 2>/dev/null | grep "clocks while"
done
