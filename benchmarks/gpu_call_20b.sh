#!/usr/bin/env bash
# Twentieth session, call 2 (one H200; carry .whl-min): nam-125m with the residual stream in bf16
# (policy.precision.residual=compute) and Mamba's in_proj as three GEMMs (policy.kernels.mamba_in_proj=split),
# alone and together, alternating with the preset; then one profiled step of both. Outputs in one archive.
source benchmarks/gpu_session.sh
J=/tmp/c20b; mkdir -p $J
R="--set policy.precision.residual=compute"; S="--set policy.kernels.mamba_in_proj=split"
B="python3 -m megacpp bench --recipe nam-125m --steps 8 --warmup 3 --no-family-times --no-kernels --accum 0 --json"
for round in 1 2; do
  timeout 120 $B > $J/p$round.json 2> $J/p$round.err
  timeout 120 $B $R $S > $J/rs$round.json 2> $J/rs$round.err
  timeout 120 $B $R > $J/r$round.json 2> $J/r$round.err
  timeout 120 $B $S > $J/s$round.json 2> $J/s$round.err
done
timeout 150 python3 -m megacpp bench --recipe nam-125m --steps 3 --warmup 2 --no-family-times --top-kernels 60 --accum 0 --json $R $S > $J/prof_rs.json 2> $J/prof_rs.err
python3 benchmarks/show_bench.py --rows $(ls -tr /tmp/c20b/*[12].json)
python3 benchmarks/show_bench.py $J/prof_rs.json 2>&1 | sed -n 1,12p | cut -c1-200
tar czf $OUT/c20b.tar.gz -C /tmp c20b
