#!/usr/bin/env bash
# Twenty-second session, call 2 (one H200; carry .whl-min, .gpudata/cpp-125m): document-masked
# attention at nam-125m's A layer through every backend this torch has (FlexAttention as the model
# runs it, FlashAttention-2 and cuDNN on packed variable-length documents, SDPA flash on whole rows);
# the SSD's bf16 dA over seeds; the SSD's and SwiGLU's CUDA tests; then (time allowing) 30 training
# steps on C++ with the MoE's gates in the experts' activation against the preset. One archive.
source benchmarks/gpu_session.sh
J=/tmp/c22b; mkdir -p $J; T0=$(date +%s)
left() { echo $(( 570 - ($(date +%s) - T0) )); }
timeout 170 python3 benchmarks/attn_backends_bench.py --json $J/attn.json > $J/attn.txt 2>&1; tail -8 $J/attn.txt
timeout 60 python3 benchmarks/ssd_fp32_seeds.py --seeds 30 --dtype bfloat16 --json $J/seeds_bf16.json 2>&1 | tee $J/seeds_bf16.txt
timeout -s INT 200 python3 -m pytest -q -rf --tb=line -p no:cacheprovider -p no:warnings -m gpu tests/ops/test_ssd_triton.py tests/ops/test_swiglu.py > $J/tests.txt 2>&1; tail -4 $J/tests.txt
if [ $(left) -gt 200 ]; then
  cp -r .gpudata/cpp-125m /root/cpp-125m-g
  for v in preset gate; do X=""; [ $v = gate ] && X="--set policy.kernels.moe_gate=activation"
    L=$(( $(left) / 2 )); [ $v = gate ] && L=$(( $(left) - 10 ))
    timeout $L python3 -m megacpp train --recipe nam-125m --data /root/cpp-125m-g --out /tmp/tg-$v --quiet --max-steps 30 --set policy.eval_interval=30 --set policy.eval_batches=4 $X > $J/train_$v.log 2>&1 || echo "train $v: rc $?"
  done
  python3 benchmarks/compare_train_losses.py /tmp/tg-preset /tmp/tg-gate 2>&1 | tee $J/train_gate.txt | tail -8
  grep -h "bits/byte" /tmp/tg-*/train.log | tee -a $J/train_gate.txt
  for v in preset gate; do mkdir -p $J/tg-$v; cp /tmp/tg-$v/run.json /tmp/tg-$v/metrics.jsonl $J/tg-$v/ 2>/dev/null; done
else echo "no time left for the training pair ($(left) s)"; fi
tar czf $OUT/c22b.tar.gz -C /tmp c22b
