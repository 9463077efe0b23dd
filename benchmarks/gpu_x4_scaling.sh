#!/usr/bin/env bash
# Data-parallel scaling on one 4-GPU (or 2-GPU, ROUNDS="0 3 5") machine, one call (issue 9):
# nam-1b and nam-125m under FSDP2 at 1, 2 and 4 GPUs. Runs that need
# fewer GPUs go side by side on disjoint GPUs (CUDA_VISIBLE_DEVICES,
# distinct torchrun ports), so the whole sweep fits one short call.
# Carry .whl-min (liger-kernel, tomli-w) and .gpudata/cpp-125m.
#   bash benchmarks/gpu_x4_scaling.sh
source benchmarks/gpu_session.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
STEPS=${STEPS:-16}; SKIP=${SKIP:-5}
S="python3 benchmarks/scaling.py --data .gpudata/cpp-125m --steps $STEPS --skip $SKIP --sharding fsdp2 --timeout ${RUN_TIMEOUT:-300}"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
mkdir -p /root/sc
ROUNDS=${ROUNDS:-1 2 3 4}   # e.g. ROUNDS="3 4" for nam-125m at 2 and 4 GPUs only; 6: profiles at 1 and 2 GPUs;
                            # 7: nam-125m at 2 GPUs under DDP, and FSDP2 at micro batch 32 (1 and 2 GPUs)
# On a 2-GPU machine: ROUNDS="0 3 5" (both recipes at 1 GPU side by side,
# then nam-125m and nam-1b at 2 GPUs), so the baselines share the call.
has() { [[ " $ROUNDS " == *" $1 "* ]]; }
if has 0; then
  CUDA_VISIBLE_DEVICES=0 $S --recipes nam-125m --worlds 1 --master-port 29500 --json $OUT/sc_125m_w1.json > /root/sc/125m_w1.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $S --recipes nam-1b --worlds 1 --master-port 29550 --json $OUT/sc_1b_w1.json > /root/sc/1b_w1.log 2>&1 &
  wait; echo "round 0 done at ${SECONDS}s"
fi
if has 1; then
  CUDA_VISIBLE_DEVICES=0 $S --recipes nam-1b --worlds 1 --master-port 29600 --json $OUT/sc_1b_w1.json > /root/sc/1b_w1.log 2>&1 &
  CUDA_VISIBLE_DEVICES=1 $S --recipes nam-125m --worlds 1 --master-port 29700 --json $OUT/sc_125m_w1.json > /root/sc/125m_w1.log 2>&1 &
  CUDA_VISIBLE_DEVICES=2,3 $S --recipes nam-1b --worlds 2 --master-port 29800 --json $OUT/sc_1b_w2.json > /root/sc/1b_w2.log 2>&1 &
  wait; echo "round 1 done at ${SECONDS}s"
fi
if has 2; then
  $S --recipes nam-1b --worlds 4 --master-port 29900 --json $OUT/sc_1b_w4.json > /root/sc/1b_w4.log 2>&1
  echo "round 2 done at ${SECONDS}s"
fi
if has 3; then
  CUDA_VISIBLE_DEVICES=0,1 $S --recipes nam-125m --worlds 2 --master-port 30000 --json $OUT/sc_125m_w2.json > /root/sc/125m_w2.log 2>&1
  echo "round 3 done at ${SECONDS}s"
fi
if has 4; then
  $S --recipes nam-125m --worlds 4 --master-port 30100 --json $OUT/sc_125m_w4.json > /root/sc/125m_w4.log 2>&1
  echo "round 4 done at ${SECONDS}s"
fi
if has 5; then
  CUDA_VISIBLE_DEVICES=0,1 $S --recipes nam-1b --worlds 2 --master-port 30200 --json $OUT/sc_1b_w2.json > /root/sc/1b_w2.log 2>&1
  echo "round 5 done at ${SECONDS}s"
fi
if has 6; then
  # where the per-GPU loss at 2 GPUs goes: the same 14 steps of nam-125m profiled
  # (steps 10-12, rank 0) at 1 GPU and at 2, side by side on disjoint GPUs
  prof() {  # $1: GPUs, $2: world, $3: port
    CUDA_VISIBLE_DEVICES=$1 python3 -m torch.distributed.run --nproc_per_node "$2" --master_port "$3" \
      -m megacpp train --recipe nam-125m --data .gpudata/cpp-125m --out /root/sc/prof-w$2 --quiet \
      --max-steps 14 --profile 10:13 --set policy.parallel.data="$2" \
      --set policy.parallel.sharding=$([ "$2" = 1 ] && echo none || echo fsdp2) \
      --set policy.global_batch=$((16 * $2)) --set policy.eval_batches=0 > /root/sc/prof-w$2.log 2>&1
    cp /root/sc/prof-w$2/profile.txt "$OUT/profile_nam125m_w$2.txt"
  }
  if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then
    prof 0 1 30300 & prof 2,3 2 30400 & wait
  else  # a 2-GPU machine: one after the other
    prof 0 1 30300; prof 0,1 2 30400
  fi
  head -n 1 "$OUT"/profile_nam125m_w*.txt; echo "round 6 done at ${SECONDS}s"
fi
if has 7; then
  # is the 2-GPU loss a per-step host cost? (a) DDP instead of FSDP2 (one
  # bucketed all-reduce, no per-layer hooks), (b) FSDP2 with twice the
  # per-device batch (the same host work per step over twice the tokens)
  CUDA_VISIBLE_DEVICES=0,1 ${S/--sharding fsdp2/--sharding ddp} --recipes nam-125m --worlds 2 --master-port 30500 --json $OUT/sc_125m_w2_ddp.json > /root/sc/125m_w2_ddp.log 2>&1
  CUDA_VISIBLE_DEVICES=0 $S --recipes nam-125m --worlds 1 --micro-batch 32 --master-port 30600 --json $OUT/sc_125m_w1_mb32.json > /root/sc/125m_w1_mb32.log 2>&1
  CUDA_VISIBLE_DEVICES=0,1 $S --recipes nam-125m --worlds 2 --micro-batch 32 --master-port 30700 --json $OUT/sc_125m_w2_mb32.json > /root/sc/125m_w2_mb32.log 2>&1
  echo "round 7 done at ${SECONDS}s"
fi
tail -n 3 /root/sc/*.log | grep -v "^$" | tail -n 30
python3 benchmarks/scaling.py --data none --merge $OUT/sc_*.json
