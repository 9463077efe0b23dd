#!/usr/bin/env bash
# Nineteenth session, call 2 (one H200; carry .whl-min): the causal conv's backward walk over
# NB blocks a program (fewer d(weight) partials and re-walked rows) — its CUDA tests, a sweep of
# its launch at nam-125m's M conv, and nam-125m's step with the sweep's choice against the
# defaults (NB = 1, the old kernel's work), alternating; then where the FP8 expert weight
# gradient's time goes at nam-1b (call 1 measured it 15% slower): one profiled step.
# Measured: NB > 1 was slower (0.27 -> 0.31 ms at NB 4-8; NB 2 even), so the kernel change was
# reverted after this call; the script records what ran (at that commit, dc15140).
source benchmarks/gpu_session.sh
J=$OUT/c19b; mkdir -p $J
timeout 120 python3 -m pytest -q -rA --tb=short -p no:cacheprovider -p no:warnings -m gpu tests/ops/test_causal_conv.py 2>&1 | grep -E "PASSED|FAILED|passed|failed|Error" | tail -40
timeout 200 python3 benchmarks/conv_tune.py --path walk --kernels bwd_walk --tune-shape 16,2048,1792,4 \
  --shapes 16,2048,1792,4 16,2048,768,4 --json $J/conv_tune.json > $J/conv_tune.log 2>&1; tail -12 $J/conv_tune.log
B="bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
T="python3 benchmarks/bench_tuned.py --module megacpp.ops.causal_conv.triton_conv --tuned $J/conv_tune.json --"
if [ -s $J/conv_tune.json ]; then
  for i in 1 2; do
    timeout 90 python3 -m megacpp $B > $J/nb_p$i.json 2> $J/nb_p$i.log
    timeout 90 $T $B > $J/nb_t$i.json 2> $J/nb_t$i.log
  done
fi
timeout 150 python3 -m megacpp bench --recipe nam-1b-fp8 --steps 3 --warmup 2 --no-family-times --top-kernels 25 --accum 0 \
  --set policy.precision.expert_low_precision=fp8_rowwise_wgrad > $J/wg_prof.txt 2>&1
sed -n 1,40p $J/wg_prof.txt | cut -c1-150
for f in $J/nb_*.json; do [ -s "$f" ] && printf "%s " "$(basename $f)" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p; done
