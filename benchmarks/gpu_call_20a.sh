#!/usr/bin/env bash
# Twentieth session, call 1 (one H200; carry .whl-min): where nam-125m's step goes now, every
# kernel named (--top-kernels 400, JSON), with inductor's generated code kept to map its fused
# kernels to model parts; the HF peer and dense-125m beside it on the same card.
source benchmarks/gpu_session.sh
J=/tmp/c20a; mkdir -p $J
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > $J/gpu.txt
timeout 200 python3 benchmarks/hf_llama_peer.py --recipe dense-125m --accum 0 --json $J/peer.json > $J/peer.log 2>&1
timeout 150 python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json > $J/nam.json 2> $J/nam.err
TORCH_LOGS=output_code timeout 240 python3 -m megacpp bench --recipe nam-125m --steps 3 --warmup 2 --no-family-times --top-kernels 400 --accum 0 --json > $J/prof.json 2> $J/code.log
timeout 120 python3 -m megacpp bench --recipe dense-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json > $J/dense.json 2> $J/dense.err
gzip -9 $J/code.log
python3 benchmarks/show_bench.py $J/nam.json $J/dense.json 2>&1 | tail -8
python3 - <<'PY'
import json
p = json.load(open("/tmp/c20a/peer.json")); print("peer", {k: p[k] for k in p if not isinstance(p[k], (dict, list))})
PY
tar czf $OUT/c20a.tar.gz -C /tmp c20a
ls -la $OUT
