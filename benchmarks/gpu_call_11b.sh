#!/usr/bin/env bash
# Eleventh session, third call (one H200; carry .whl, .gpudata/cpp-125m): CUDA graphs
# with gradient accumulation. nam-125m's per-layer graphs (scope "block") failed with
# two micro-batches a step, marker or not; does one graph for the whole model work,
# and does the all-M preset (already scope "model") work with two?
source benchmarks/gpu_session.sh
cp -r .gpudata/cpp-125m /root/cpp-125m
B="python3 -m megacpp bench --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0"
$B --recipe nam-125m --set policy.compile.mode=auto --set policy.compile.scope=model --json > $OUT/bench_nam125m_model_accum.json 2> $OUT/b1.err; echo "nam-125m auto model accum: rc $?"
$B --recipe mamba2-130m --set policy.global_batch=16 --json > $OUT/bench_mamba_accum2.json 2> $OUT/b2.err; echo "mamba2-130m graphs model accum 2: rc $?"
for m in default auto; do
  timeout 150 python3 -m megacpp train --recipe nam-125m --data /root/cpp-125m --out /tmp/tm-$m --quiet --max-steps 40 \
    --set policy.eval_batches=2 --set policy.eval_interval=20 --set policy.compile.mode=$m --set policy.compile.scope=model \
    > $OUT/train_$m.log 2>&1; echo "train nam-125m scope model $m: rc $?"
done
python3 benchmarks/compare_train_losses.py /tmp/tm-default /tmp/tm-auto | tee $OUT/train_model_scope.txt
for f in $OUT/bench_*.json; do python3 benchmarks/show_bench.py $f | sed -n 2,3p; done
tail -3 $OUT/b1.err $OUT/b2.err; grep -h "tokens/s\|Error" $OUT/train_*.log | tail -6
