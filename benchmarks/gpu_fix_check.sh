#!/usr/bin/env bash
# One 1-GPU call (fifth session): the CUDA checks of this session's two fixes,
# then the four 500-step precision curves (issue 10) side by side on the card,
# then nam-125m's bench with the MoE gather fix (issue 8) if time is left.
# Carry .whl-min and .gpudata/cpp-125m.
#   WHL=.whl-min bash benchmarks/gpu_fix_check.sh
# (SKIP_TESTS=1 CURVE_LIMIT=420: the curves alone, long enough for NVFP4's 500 steps)
source benchmarks/gpu_session.sh
nvidia-smi --query-gpu=name --format=csv,noheader
L=/root/log; mkdir -p $L; cp -r .gpudata/cpp-125m /root/cpp-125m
# 1. NVFP4 compiled vs eager, compiled blocks' gradients vs eager, the MoE on CUDA
[ -n "$SKIP_TESTS" ] || timeout 170 python3 -m pytest -q -p no:cacheprovider -p no:warnings -m gpu tests/precision \
  tests/model/test_compiled_grads_gpu.py tests/model/test_model_gpu.py > $L/tests.log 2>&1
echo "tests rc $? at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error:" $L/tests.log | grep -v DEBUG | tail -8
# 2. bf16, fp16, fp8 rowwise, emulated NVFP4: same data and seed, one process each
CURVE_LIMIT=${CURVE_LIMIT:-300}
for m in bf16 fp16 fp8 nvfp4_emulated; do
  timeout $((CURVE_LIMIT + 60)) python3 benchmarks/precision_bench.py --part curves --steps 500 \
    --micro-batch 8 --set policy.global_batch=8 --modes $m --data /root/cpp-125m \
    --time-limit $CURVE_LIMIT --json $OUT/curve_$m.json > $L/curve_$m.log 2>&1 &
done
wait; echo "curves done at ${SECONDS}s"; grep -h "\[curves\]" $L/curve_*.log
# 3. what is left: nam-125m's bench (the MoE gather's backward is no index_put now)
LEFT=$(( ${DEADLINE:-585} - SECONDS ))
if [ $LEFT -gt 60 ]; then
  timeout $LEFT python3 -m megacpp bench --recipe nam-125m --steps 10 --warmup 4 --json \
    > $OUT/bench_nam125m.json 2> $L/bench.log; echo "bench rc $? at ${SECONDS}s"
  python3 -c "import json; d=json.load(open('$OUT/bench_nam125m.json')); print({k: d[k] for k in ('tokens_per_s','mfu','peak_memory_gib','step_ms_median')}, d.get('family_ms'))" 2>/dev/null
fi
tar czf $OUT/logs.tar.gz -C $L .
