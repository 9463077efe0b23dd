#!/usr/bin/env bash
# Queued for the eighteenth session, on a 2x H200 host (carry .whl-min): nam-125m's preset
# against the Triton SwiGLU + the experts' weight gradient in 4 parts, three runs each,
# alternating, on two cards (jobs ab125_18a/b in benchmarks/gpu_jobs.txt).
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 420 --out $OUT/jobs.tar.gz --only ab125_18a ab125_18b
for f in /tmp/gpu-jobs/ab125_*.json; do
  [ -s "$f" ] && printf "%s " "$(basename $f)" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p
done
