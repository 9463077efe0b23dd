#!/usr/bin/env bash
# Eighteenth session, second call, on one H200 (carry .whl-min, .gpudata/cpp-125m and .ab_old,
# the code of 8a8e78e: `git archive 8a8e78e src | tar -x -C .ab_old`): nam-125m's preset now
# (experts' weight gradient in 4 parts and the Triton SwiGLU by default; the MoE aux terms
# inside the compiled model; the micro-batches' gradients summed by one foreach pass) against
# 8a8e78e with the same two kernel choices by environment, alternating; 30 training steps of
# each on the pinned C++ snapshot (losses must agree); the new step profiled; the HF peer.
source benchmarks/gpu_session.sh
J=/tmp/gpu-jobs; mkdir -p $J; cp -r .gpudata/cpp-125m /root/cpp-125m
OLD="env PYTHONPATH=/tmp/site:$PWD/.ab_old/src MEGACPP_SWIGLU=triton MEGACPP_MOE_WGRAD_SPLITS=4"
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
T="python3 -m megacpp train --recipe nam-125m --data /root/cpp-125m --max-steps 30 --quiet --set policy.eval_interval=1000 --set policy.log_interval=1"
timeout 170 $T --out $J/train_new > $J/train_new.log 2>&1; echo "train new done at ${SECONDS}s"
timeout 170 $OLD $T --out $J/train_old > $J/train_old.log 2>&1; echo "train old done at ${SECONDS}s"
for i in 1 2; do
  [ $SECONDS -lt 330 ] || break
  timeout 120 $OLD $B > $J/ab2_old$i.json 2> $J/ab2_old$i.log; echo "old$i done at ${SECONDS}s"
  timeout 120 $B > $J/ab2_new$i.json 2> $J/ab2_new$i.log; echo "new$i done at ${SECONDS}s"
done
[ $SECONDS -lt 450 ] && timeout 90 python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times \
  --accum 0 --top-kernels 40 > $J/bench_new_prof.txt 2> $J/bench_new_prof.log; echo "profile done at ${SECONDS}s"
[ $SECONDS -lt 500 ] && timeout 80 python3 benchmarks/hf_llama_peer.py --recipe dense-125m --accum 0 \
  --json $J/hf_llama_18b.json > $J/hf_llama_18b.log 2>&1; echo "peer done at ${SECONDS}s"
tar czf $OUT/jobs.tar.gz -C /tmp gpu-jobs
for f in $J/ab2_*.json; do
  [ -s "$f" ] && printf "%s " "$(basename $f)" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p
done
for r in new old; do echo "== train $r"; tail -2 $J/train_$r.log; python3 -c "
import json,sys
rows=[json.loads(l) for l in open('$J/train_$r/metrics.jsonl') if '\"train\"' in l]
print(' '.join(f\"{r['loss']:.4f}\" for r in rows[::5]), 'last', rows[-1]['loss'])" 2>&1 | tail -2; done
sed -n 1,8p $J/bench_new_prof.txt; grep -c . $J/bench_new_prof.txt; tail -2 $J/hf_llama_18b.log
