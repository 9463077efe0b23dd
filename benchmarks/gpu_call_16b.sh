#!/usr/bin/env bash
# Sixteenth session, second call (2x H200; carry .whl-min and .gpudata/cpp-125m): torchao's
# quantization kernels in front of the FP8 grouped GEMM; nam-1b trained 40 steps with it.
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 580 --out $OUT/jobs.tar.gz \
  --only fp8q_bench_16 fp8x_train_16b
grep -E "passed|failed|FAILED" /tmp/gpu-jobs/fp8q_bench_16.log | tail -4
grep -A14 "^GEMM" /tmp/gpu-jobs/fp8q_bench_16.log
for f in /tmp/gpu-jobs/bench_*.json; do
  [ -s "$f" ] && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 1,3p
done
python3 - <<'PY'
import json
for l in open('/tmp/gpu-jobs/ty-fp8x/metrics.jsonl'):
    r = json.loads(l)
    if r.get('kind') == 'val' or r.get('step') in (0, 9, 19, 29, 30, 35, 39):
        print(r.get('kind'), r.get('step'), round(r.get('loss', r.get('bpb', 0)), 4), r.get('bpb'))
PY
cat /tmp/gpu-jobs/train_fp8x_b.txt; tail -3 /tmp/gpu-jobs/fp8x_train_16b.log
