#!/usr/bin/env bash
# Seventeenth session, second call, on a 4x H200 host (carry .whl-min): the Triton FP8
# quantizer's A/B on more cards, nam-1b FP8 at its preset micro batch, nam-125m's profile
# with the GPU's idle gaps (jobs q17_c q17_d q17_e prof125_17b in benchmarks/gpu_jobs.txt).
# On a 2x host name the jobs of each call: `bash benchmarks/gpu_call_17b.sh q17_c q17_d`, then
# `... q17_e prof125_17b`.
source benchmarks/gpu_session.sh
JOBS="${*:-q17_c q17_d q17_e prof125_17b}"
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 575 --out $OUT/jobs.tar.gz --only $JOBS
for f in /tmp/gpu-jobs/q_*.json; do
  [ -s "$f" ] && echo "$f" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p
done
[ -s /tmp/gpu-jobs/bench_nam125m_prof_17b.txt ] && sed -n '/profiled step/,$p' /tmp/gpu-jobs/bench_nam125m_prof_17b.txt | tail -12
