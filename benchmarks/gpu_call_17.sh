#!/usr/bin/env bash
# The next session's calls (BENCHMARKS.md "Not yet measured"), each on a 2x H200 host:
#   a  the one-pass Triton FP8 quantizer against the default on nam-1b (carry .whl-min)
#   b  nam-1b 300 steps, bf16 beside FP8 dense + experts (carry .whl-min, .gpudata/cpp-125m);
#      the runs' manifests show their clocks over the counted steps (outcome.clocks.window)
source benchmarks/gpu_session.sh
case "${1:-a}" in
  a) python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 575 --out $OUT/jobs.tar.gz \
       --only fp8q_triton_a fp8q_triton_b
     grep -E "passed|failed" /tmp/gpu-jobs/fp8q_triton_a.log | tail -2
     grep -A16 "^GEMM" /tmp/gpu-jobs/fp8q_triton_a.log
     for f in /tmp/gpu-jobs/q_*.json; do
       [ -s "$f" ] && echo "$f" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p
     done ;;
  b) bash benchmarks/gpu_call_16.sh
     python3 -c "import json; [print(d, json.load(open(f'/tmp/gpu-jobs/{d}/run.json'))['outcome'].get('clocks')) for d in ('c1b-bf16', 'c1b-fp8')]" ;;
  *) echo "usage: gpu_call_17.sh a|b" >&2; exit 2 ;;
esac
