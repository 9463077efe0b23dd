#!/usr/bin/env bash
# Twenty-second session, call 3 (one H200; carry .whl-min): the SwiGLU row-scale CUDA tests at their
# new bf16 d(scale) bound; the HF Llama peer, then the nam-125m preset (now with the MoE's gates in
# the experts' activation) twice; nam-1b-fp8 with the gates in the activation once (its preset's
# earlier runs are the comparison: a memory point, a single speed point). One archive.
source benchmarks/gpu_session.sh
J=/tmp/c22c; mkdir -p $J
timeout -s INT 60 python3 -m pytest -q -rf --tb=line -p no:cacheprovider -p no:warnings -m gpu tests/ops/test_swiglu.py -k row_scale > $J/tests.txt 2>&1; tail -2 $J/tests.txt
timeout 150 python3 benchmarks/hf_llama_peer.py --recipe dense-125m --accum 0 --json $J/peer.json > $J/peer.log 2>&1
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
timeout 140 $B > $J/n1.json 2> $J/n1.err
timeout 90 $B > $J/n2.json 2> $J/n2.err
timeout 190 python3 -m megacpp bench --recipe nam-1b-fp8 --steps 4 --warmup 2 --no-family-times --no-kernels --accum 0 --json --set policy.kernels.moe_gate=activation > $J/b1g.json 2> $J/b1g.err
tar czf $OUT/c22c.tar.gz -C /tmp c22c
python3 benchmarks/show_bench.py --rows $J/n1.json $J/n2.json $J/b1g.json
python3 - <<'PY'
import json
p = json.load(open("/tmp/c22c/peer.json"))
print(f"peer {p['tokens_per_s']:,.0f} tok/s peak {p['peak_memory_gib']:.2f} GiB SM {p['clocks'].get('sm_mhz_median')}")
for k in ("n1", "n2"):
    r = json.load(open(f"/tmp/c22c/{k}.json"))
    print(f"{k}: {r['tokens_per_s'] / p['tokens_per_s']:.3f}x the peer")
PY
