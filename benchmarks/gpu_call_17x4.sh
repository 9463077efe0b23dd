#!/usr/bin/env bash
# Seventeenth session, first call, on a 4x H200 host (carry .whl-min, .gpudata/cpp-125m):
# gpu_call_17.sh's a and b in one call, one job a card, plus nam-125m's profiled step and
# the HF peer (job prof125_q_b_17, which also runs the Triton quantizer's second order).
source benchmarks/gpu_session.sh
python3 benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --deadline 575 --out $OUT/jobs.tar.gz \
  --only curve_1b_bf16_16 curve_1b_fp8_16 fp8q_triton_a prof125_q_b_17
grep -E "passed|failed" /tmp/gpu-jobs/fp8q_triton_a.log | tail -2
python3 benchmarks/compare_train_losses.py /tmp/gpu-jobs/c1b-bf16 /tmp/gpu-jobs/c1b-fp8 --steps 0,49,99,149,199,249,299 \
  | tee /tmp/gpu-jobs/curve_1b.txt
python3 -m megacpp compare /tmp/gpu-jobs/c1b-bf16 /tmp/gpu-jobs/c1b-fp8 2>&1 | tail -22 | tee -a /tmp/gpu-jobs/curve_1b.txt
python3 -c "import json; [print(d, json.load(open(f'/tmp/gpu-jobs/{d}/run.json'))['outcome'].get('clocks')) for d in ('c1b-bf16', 'c1b-fp8')]"
for f in /tmp/gpu-jobs/q_*.json /tmp/gpu-jobs/bench_nam125m_prof_17.json; do
  [ -s "$f" ] && echo "$f" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p
done
