#!/usr/bin/env bash
# Twentieth session, call 3 (one H200; carry .whl-min, .gpudata/cpp-125m): the HF peer beside nam-125m
# with the bf16 residual stream + split in_proj on one card, then 300 training steps of the preset and of
# that setting on the pinned C++ snapshot (same seed), losses and val bits/byte side by side.
source benchmarks/gpu_session.sh
J=/tmp/c20c; mkdir -p $J
RS="--set policy.precision.residual=compute --set policy.kernels.mamba_in_proj=split"
timeout 150 python3 benchmarks/hf_llama_peer.py --recipe dense-125m --accum 0 --json $J/peer.json > $J/peer.log 2>&1
timeout 100 python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json $RS > $J/rs.json 2> $J/rs.err
cp -r .gpudata/cpp-125m /root/cpp-125m-r
for v in preset rs; do X=""; [ $v = rs ] && X="$RS"
  timeout 150 python3 -m megacpp train --recipe nam-125m --data /root/cpp-125m-r --out /tmp/tr-$v --quiet --max-steps 300 \
    --set policy.eval_interval=100 --set policy.eval_batches=8 $X > $J/train_$v.log 2>&1 || echo "train $v failed: rc $?"
  mkdir -p $J/tr-$v && cp /tmp/tr-$v/run.json /tmp/tr-$v/metrics.jsonl $J/tr-$v/ 2>/dev/null
done
python3 benchmarks/compare_train_losses.py /tmp/tr-preset /tmp/tr-rs --steps 0,49,99,149,199,249,299 2>&1 | tee $J/train_cmp.txt | tail -14
grep -h "bits/byte" /tmp/tr-*/train.log $J/train_*.log 2>/dev/null | head -8
python3 -m megacpp compare /tmp/tr-preset /tmp/tr-rs > $J/compare.txt 2>&1; head -30 $J/compare.txt
python3 - <<'PY'
import json
p = json.load(open("/tmp/c20c/peer.json")); r = json.load(open("/tmp/c20c/rs.json"))
print(f"peer {p['tokens_per_s']:,.0f} tok/s peak {p['peak_memory_gib']:.2f}; rs {r['tokens_per_s']:,.0f} tok/s "
      f"MFU {r['mfu']*100:.1f}% peak {r['peak_memory_gib']:.2f} -> {r['tokens_per_s']/p['tokens_per_s']:.3f}x; "
      f"SM {r['clocks'].get('sm_mhz_median')} / peer {p['clocks'].get('sm_mhz_median')}")
PY
tar czf $OUT/c20c.tar.gz -C /tmp c20c
