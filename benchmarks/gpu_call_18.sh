#!/usr/bin/env bash
# Queued for the eighteenth session (BENCHMARKS.md "Not yet measured" 3), on a 2x H200 host;
# carry .whl-min and .gpudata/cpp-125m: the nam-1b-fp8 preset under FSDP2 at 2 GPUs beside
# one GPU, and nam-1b (bf16) at 2 GPUs: does FP8 dense + experts run sharded, and at what
# tokens/s per GPU. Micro batch 16 a GPU in every run (the bf16 preset's; 32 would be
# 85 GiB), the global batch scaled by the world size (benchmarks/scaling.py).
source benchmarks/gpu_session.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
mkdir -p /root/sc && cp -r .gpudata/cpp-125m /root/cpp-125m
S="python3 benchmarks/scaling.py --data /root/cpp-125m --steps 14 --skip 4 --sharding fsdp2 --timeout 200 --micro-batch 16"
CUDA_VISIBLE_DEVICES=0 $S --recipes nam-1b-fp8 --worlds 1 --master-port 29500 --json $OUT/sc_fp8_w1.json > /root/sc/fp8_w1.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 $S --recipes nam-1b --worlds 1 --master-port 29600 --json $OUT/sc_bf16_w1.json > /root/sc/bf16_w1.log 2>&1 &
wait; echo "one-GPU runs done at ${SECONDS}s"
CUDA_VISIBLE_DEVICES=0,1 $S --recipes nam-1b-fp8 --worlds 2 --master-port 29700 --json $OUT/sc_fp8_w2.json > /root/sc/fp8_w2.log 2>&1
echo "fp8 w2 done at ${SECONDS}s"
[ $SECONDS -lt 380 ] && CUDA_VISIBLE_DEVICES=0,1 $S --recipes nam-1b --worlds 2 --master-port 29800 --json $OUT/sc_bf16_w2.json > /root/sc/bf16_w2.log 2>&1
# the bench's per-family times under CUDA graphs (each family's layer compiled alone; built in
# the seventeenth session without a GPU left to run it): nam-125m's preset, families on
[ $SECONDS -lt 470 ] && CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m megacpp bench --recipe nam-125m --steps 4 \
  --warmup 2 --accum 0 --top-kernels 10 > $OUT/bench_nam125m_families.txt 2>&1; grep -A3 "per family" $OUT/bench_nam125m_families.txt
tail -5 /root/sc/*.log
python3 benchmarks/scaling.py --data /root/cpp-125m --merge $OUT/sc_*.json 2>&1 | tail -12
