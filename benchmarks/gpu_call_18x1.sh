#!/usr/bin/env bash
# Eighteenth session, first call, on one H200 (only 1-GPU machines lent; carry .whl-min):
# nam-125m's preset against the Triton SwiGLU + the experts' weight gradient in 4 parts
# together, alternating, as many pairs as fit in ~330 s; then the bench's per-family times
# under CUDA graphs (first GPU run of that probe); then the HF peer on the same card.
source benchmarks/gpu_session.sh
J=/tmp/gpu-jobs; mkdir -p $J
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
C="env MEGACPP_SWIGLU=triton MEGACPP_MOE_WGRAD_SPLITS=4"
for i in 1 2 3; do
  [ $SECONDS -lt 300 ] || break
  timeout 150 $B > $J/ab125_p$i.json 2> $J/ab125_p$i.log; echo "p$i done at ${SECONDS}s"
  timeout 150 $C $B > $J/ab125_c$i.json 2> $J/ab125_c$i.log; echo "c$i done at ${SECONDS}s"
done
timeout 120 python3 -m megacpp bench --recipe nam-125m --steps 4 --warmup 2 --accum 0 --top-kernels 10 \
  > $J/bench_nam125m_families.txt 2> $J/bench_nam125m_families.log; echo "families done at ${SECONDS}s"
[ $SECONDS -lt 480 ] && timeout 100 python3 benchmarks/hf_llama_peer.py --recipe dense-125m --accum 0 \
  --json $J/hf_llama_18.json > $J/hf_llama_18.log 2>&1; echo "peer done at ${SECONDS}s"
tar czf $OUT/jobs.tar.gz -C /tmp gpu-jobs
for f in $J/ab125_*.json; do
  [ -s "$f" ] && printf "%s " "$(basename $f)" && python3 benchmarks/show_bench.py "$f" 2>/dev/null | sed -n 3p
done
sed -n 1,12p $J/bench_nam125m_families.txt; grep -i -A8 "famil" $J/bench_nam125m_families.txt | head -20
tail -3 $J/bench_nam125m_families.log; tail -4 $J/hf_llama_18.log
