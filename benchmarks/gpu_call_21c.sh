#!/usr/bin/env bash
# Twenty-first session, call 3 (one H200; carry .whl-min): the HF Llama peer, then nam-125m with the
# SSD's state scans as one loop at the swept launch (the new default) alternating with the nested
# kernels (MEGACPP_SSD_STATE_LOOP=nested, the twentieth session's code path), then the state kernels'
# own times at the new launch. Outputs in one archive.
source benchmarks/gpu_session.sh
J=/tmp/c21c; mkdir -p $J
timeout 150 python3 benchmarks/hf_llama_peer.py --recipe dense-125m --accum 0 --json $J/peer.json > $J/peer.log 2>&1
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
MEGACPP_SSD_STATE_LOOP=nested timeout 140 $B > $J/n1.json 2> $J/n1.err
timeout 100 $B > $J/f1.json 2> $J/f1.err
MEGACPP_SSD_STATE_LOOP=nested timeout 90 $B > $J/n2.json 2> $J/n2.err
timeout 90 $B > $J/f2.json 2> $J/f2.err
timeout 90 python3 benchmarks/ssd_state_loop.py --bk 64,128 --stages 2,4 --json $J/state_loop.json > $J/state_loop.txt 2>&1
tail -8 $J/state_loop.txt
tar czf $OUT/c21c.tar.gz -C /tmp c21c
python3 benchmarks/show_bench.py --rows $(ls -tr $J/[nf][12].json)
python3 - <<'PY'
import json
p = json.load(open("/tmp/c21c/peer.json"))
print(f"peer {p['tokens_per_s']:,.0f} tok/s peak {p['peak_memory_gib']:.2f} GiB SM {p['clocks'].get('sm_mhz_median')}")
for k in ("f1", "f2"):
    r = json.load(open(f"/tmp/c21c/{k}.json"))
    print(f"{k}: {r['tokens_per_s'] / p['tokens_per_s']:.3f}x the peer")
PY
