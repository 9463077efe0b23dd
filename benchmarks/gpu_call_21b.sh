#!/usr/bin/env bash
# Twenty-first session, call 2 (one H200; carry .whl-min): the SSD's state scans as one loop
# (MEGACPP_SSD_STATE_LOOP=flat) against the nested loops: each kernel's own time and outputs at
# nam-125m's layer, then nam-125m's step alternating, then the SSD's CUDA tests on the flat kernels.
source benchmarks/gpu_session.sh
J=/tmp/c21b; mkdir -p $J; T0=$(date +%s)
left() { echo $(( 570 - ($(date +%s) - T0) )); }
timeout 150 python3 benchmarks/ssd_state_loop.py --json $J/state_loop.json > $J/state_loop.txt 2>&1; echo "state_loop rc $?" >> $J/state_loop.txt
tail -22 $J/state_loop.txt
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
timeout 140 $B > $J/p1.json 2> $J/p1.err
MEGACPP_SSD_STATE_LOOP=flat timeout 100 $B > $J/f1.json 2> $J/f1.err
timeout 90 $B > $J/p2.json 2> $J/p2.err
MEGACPP_SSD_STATE_LOOP=flat timeout 90 $B > $J/f2.json 2> $J/f2.err
L=$(left); echo "left for tests: $L s"
if [ $L -gt 30 ]; then MEGACPP_SSD_STATE_LOOP=flat timeout -s INT $((L - 10)) python3 -m pytest -q -rf --tb=line -p no:cacheprovider -p no:warnings -m gpu tests/ops/test_ssd_triton.py > $J/tests_flat.txt 2>&1; tail -4 $J/tests_flat.txt; fi
tar czf $OUT/c21b.tar.gz -C /tmp c21b
python3 benchmarks/show_bench.py --rows $(ls -tr $J/[pf][12].json)
