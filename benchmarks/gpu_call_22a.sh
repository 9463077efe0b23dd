#!/usr/bin/env bash
# Twenty-second session, call 1 (one H200; carry .whl-min): the SSD's float32 dA against the float64
# reference over seeds with Triton's exp and with libdevice's (BENCHMARKS.md "Not yet measured" 3a);
# nam-125m with the MoE's gates in the experts' activation alternating with the preset (3c); one
# profiled step of the preset listing 400 kernels (where the rest of the step goes). One archive.
source benchmarks/gpu_session.sh
J=/tmp/c22a; mkdir -p $J
for e in approx libdevice; do
  MEGACPP_TRITON_EXP=$e timeout 100 python3 benchmarks/ssd_fp32_seeds.py --seeds 30 --json $J/seeds_$e.json 2>&1 | tee $J/seeds_$e.txt
done
MEGACPP_TRITON_EXP=libdevice timeout 60 python3 benchmarks/ssd_fp32_seeds.py --seeds 30 --tuned --cases resets-g2-D --json $J/seeds_libdevice_tuned.json 2>&1 | tee $J/seeds_libdevice_tuned.txt
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
G="--set policy.kernels.moe_gate=activation"
timeout 140 $B > $J/p1.json 2> $J/p1.err
timeout 100 $B $G > $J/g1.json 2> $J/g1.err
timeout 90 $B > $J/p2.json 2> $J/p2.err
timeout 90 $B $G > $J/g2.json 2> $J/g2.err
timeout 100 python3 -m megacpp bench --recipe nam-125m --steps 3 --warmup 2 --no-family-times --top-kernels 400 --accum 0 --json > $J/prof.json 2> $J/prof.err
tar czf $OUT/c22a.tar.gz -C /tmp c22a
python3 benchmarks/show_bench.py --rows $(ls -tr $J/[pg][12].json)
