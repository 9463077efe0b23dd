#!/usr/bin/env bash
# Twenty-first session, call 4 (one H200; carry .whl-min): the state scans' launch at nam-1b's and
# mamba2-130m's layers, nam-125m's profiled step on the new default, nam-1b-fp8's preset once.
source benchmarks/gpu_session.sh
J=/tmp/c21d; mkdir -p $J
for s in 8,2048,64,64,1,128 8,2048,24,64,1,128; do
  timeout 70 python3 benchmarks/ssd_state_loop.py --shape $s --bk 64,128 --stages 2,4 > $J/state_loop_$s.txt 2>&1; tail -7 $J/state_loop_$s.txt
done
timeout 110 python3 -m megacpp bench --recipe nam-125m --steps 3 --warmup 2 --no-family-times --top-kernels 60 --accum 0 --json > $J/prof.json 2> $J/prof.err
timeout 190 python3 -m megacpp bench --recipe nam-1b-fp8 --steps 4 --warmup 2 --no-family-times --no-kernels --accum 0 --json > $J/n1b.json 2> $J/n1b.err
tar czf $OUT/c21d.tar.gz -C /tmp c21d
python3 benchmarks/show_bench.py --rows $J/prof.json $J/n1b.json
