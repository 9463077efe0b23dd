#!/usr/bin/env bash
# Eleventh session, fourth call (one H200; carry .whl, .gpudata/cpp-125m): CUDA graphs
# with gradient accumulation after keep_grads_outside_graphs (grads zeroed in place,
# never a graph's output buffer): nam-125m "auto" at its two micro-batches, in the bench
# and in 40 training steps against the default mode; the all-M preset at two.
source benchmarks/gpu_session.sh
cp -r .gpudata/cpp-125m /root/cpp-125m
B="python3 -m megacpp bench --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0"
timeout 120 $B --recipe nam-125m --set policy.compile.mode=auto --json > $OUT/bench_nam125m_auto_accum.json 2> $OUT/b1.err; echo "nam-125m auto accum 2: rc $?"
for m in default auto; do
  timeout 130 python3 -m megacpp train --recipe nam-125m --data /root/cpp-125m --out /tmp/tc-$m --quiet --max-steps 40 \
    --set policy.eval_batches=2 --set policy.eval_interval=20 --set policy.compile.mode=$m > $OUT/train_$m.log 2>&1
  echo "train nam-125m $m: rc $?"
done
python3 benchmarks/compare_train_losses.py /tmp/tc-default /tmp/tc-auto > $OUT/train_auto.txt 2>&1; tail -8 $OUT/train_auto.txt
timeout 90 $B --recipe mamba2-130m --set policy.global_batch=16 --json > $OUT/bench_mamba_accum2.json 2> $OUT/b2.err; echo "mamba2-130m accum 2: rc $?"
for f in $OUT/bench_*.json; do python3 benchmarks/show_bench.py $f 2>/dev/null | sed -n 2,3p; done
grep -h "RuntimeError" $OUT/*.err $OUT/train_*.log | cut -c1-200 | head -4; grep -h "^run \|bits/byte" $OUT/train_*.log
