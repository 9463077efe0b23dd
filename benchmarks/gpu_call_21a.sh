#!/usr/bin/env bash
# Twenty-first session, call 1 (one H200; carry .whl-min, .gpudata/cpp-125m): inductor's programmatic
# dependent launch (policy.compile.pdl) and combo kernels (policy.compile.combo_kernels) at nam-125m,
# alternating with the preset; then 40 training steps of the preset and of PDL on the pinned C++
# snapshot (same seed), losses side by side. Outputs in one archive.
source benchmarks/gpu_session.sh
J=/tmp/c21a; mkdir -p $J
python3 -c "import torch, torch._inductor.config as c; print('torch', torch.__version__, 'enable_pdl' in dir(c.triton), torch.cuda.get_device_name())" 2>&1 | tee $J/env.txt
D="--set policy.compile.pdl=true"; C="--set policy.compile.combo_kernels=true"
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
for round in 1 2; do
  timeout 110 $B > $J/p$round.json 2> $J/p$round.err
  timeout 110 $B $D > $J/d$round.json 2> $J/d$round.err
done
timeout 140 $B $C > $J/c1.json 2> $J/c1.err
cp -r .gpudata/cpp-125m /root/cpp-125m-r
for v in preset pdl; do X=""; [ $v = pdl ] && X="$D"
  timeout 100 python3 -m megacpp train --recipe nam-125m --data /root/cpp-125m-r --out /tmp/tr-$v --quiet --max-steps 40 \
    --set policy.eval_batches=0 $X > $J/train_$v.log 2>&1 || echo "train $v failed: rc $?"
  mkdir -p $J/tr-$v && cp /tmp/tr-$v/run.json /tmp/tr-$v/metrics.jsonl $J/tr-$v/ 2>/dev/null
done
python3 benchmarks/compare_train_losses.py /tmp/tr-preset /tmp/tr-pdl --steps 0,9,19,29,39 2>&1 | tee $J/train_cmp.txt | tail -8
tar czf $OUT/c21a.tar.gz -C /tmp c21a
python3 benchmarks/show_bench.py --rows $(ls -tr $J/*[12].json) $J/c1.json
