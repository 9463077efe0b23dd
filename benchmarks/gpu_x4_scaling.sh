#!/usr/bin/env bash
# Data-parallel scaling on one 4-GPU machine, one call (issue 9): nam-1b and
# nam-125m under FSDP2 at 1, 2 and 4 GPUs, and the FSDP2 layout variants.
# Runs that need fewer GPUs go side by side on disjoint GPUs
# (CUDA_VISIBLE_DEVICES, distinct torchrun ports). A round starts only if it
# can end before DEADLINE (seconds since the start of this script).
# Carry .whl-min (liger-kernel, tomli-w) and .gpudata/cpp-125m.
#   bash benchmarks/gpu_x4_scaling.sh                 # rounds A..E
#   ROUNDS="A P" bash benchmarks/gpu_x4_scaling.sh    # P: profiles at 1 and 2 GPUs
#   ROUNDS="V T F G" ...                              # the sixth session's first call
# V: issue 10's four 500-step precision curves, one card each (same data, seed, batch)
# T, F, G, H: the sixth session's FSDP2 layout variants (no-reshard, gather="compute")
# with the CUDA tests next to them
#   PROF_RECIPE=nam-1b ROUNDS="K G Q R" ...            # the eighth session's first call
# K: tests, nam-1b 1-GPU baseline and profile, conv sweep; Q: the 4-GPU profile;
# R: nam-1b at 4 GPUs with bf16 GEMM gathers and a bf16 gradient reduce
source benchmarks/gpu_session.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
STEPS=${STEPS:-14}; SKIP=${SKIP:-4}; RT=${RUN_TIMEOUT:-200}; DEADLINE=${DEADLINE:-575}
mkdir -p /root/sc; cp -r .gpudata/cpp-125m /root/cpp-125m
S="python3 benchmarks/scaling.py --data /root/cpp-125m --steps $STEPS --skip $SKIP --sharding fsdp2 --timeout $RT"
# the layout is explicit in every multi-GPU run, whatever the presets' default
# (since the sixth session the 125M/1B presets keep the weights, "no-reshard")
RS="--set policy.parallel.reshard_after_forward=true --tag reshard"
NR="--set policy.parallel.reshard_after_forward=false --tag no-reshard"
NRC="--set policy.parallel.reshard_after_forward=false --set policy.parallel.gather=compute --tag nr+compute"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'nccl', torch.cuda.nccl.version())"
ROUNDS=${ROUNDS:-A B C D E}
has() { [[ " $ROUNDS " == *" $1 "* ]] && [ $((DEADLINE - SECONDS)) -gt $((RT + 10)) ]; }
# run NAME GPUS ARGS...: one scaling.py run in the background, its rows in $OUT/sc_NAME.json
run() { local n=$1 g=$2; shift 2
  CUDA_VISIBLE_DEVICES=$g $S "$@" --json $OUT/sc_$n.json > /root/sc/$n.log 2>&1 & }
if has A; then  # both 1-GPU baselines and nam-1b at 2 GPUs, side by side
  run 1b_w1 0 --recipes nam-1b --worlds 1 --master-port 29500
  run 125m_w1 1 --recipes nam-125m --worlds 1 --master-port 29600
  run 1b_w2 2,3 --recipes nam-1b --worlds 2 $RS --master-port 29700
  wait; echo "round A done at ${SECONDS}s"
fi
if has B; then run 1b_w4 0,1,2,3 --recipes nam-1b --worlds 4 $RS --master-port 29800; wait; echo "round B done at ${SECONDS}s"; fi
if has C; then
  run 125m_w2 0,1 --recipes nam-125m --worlds 2 $RS --master-port 29900
  run 1b_w2_nr 2,3 --recipes nam-1b --worlds 2 $NR --master-port 30000
  wait; echo "round C done at ${SECONDS}s"
fi
if has D; then run 125m_w4 0,1,2,3 --recipes nam-125m --worlds 4 $RS --master-port 30100; wait; echo "round D done at ${SECONDS}s"; fi
if has E; then run 1b_w4_nr 0,1,2,3 --recipes nam-1b --worlds 4 $NR --master-port 30200; wait; echo "round E done at ${SECONDS}s"; fi
if has V; then  # ~3 min: each curve alone on its card, so every mode reaches step 500
  g=0
  for m in bf16 fp16 fp8 nvfp4_emulated; do
    CUDA_VISIBLE_DEVICES=$g timeout 330 python3 benchmarks/precision_bench.py --part curves --steps 500 \
      --micro-batch 8 --set policy.global_batch=8 --modes $m --data /root/cpp-125m \
      --json $OUT/curve_$m.json > /root/sc/curve_$m.log 2>&1 &
    g=$((g + 1))
  done
  wait; echo "round V done at ${SECONDS}s"; grep -h "\[curves\]" /root/sc/curve_*.log | tail -n 8
fi
if has T; then  # the CUDA tests beside nam-1b at 1 GPU and at 2 (no reshard, bf16 GEMM gather)
  CUDA_VISIBLE_DEVICES=0 timeout $RT python3 -m pytest -q -p no:cacheprovider -p no:warnings -m gpu tests \
    > /root/sc/gpu_tests.log 2>&1 &
  run 1b_w1 1 --recipes nam-1b --worlds 1 --master-port 30300
  run 1b_w2_nrc 2,3 --recipes nam-1b --worlds 2 $NRC --master-port 30400
  wait; echo "round T done at ${SECONDS}s"; grep -E "passed|failed|^FAILED" /root/sc/gpu_tests.log | tail -n 12
fi
if has I; then  # the CUDA tests (SIGINT at the limit: pytest still prints its failures) beside both 1-GPU baselines
  CUDA_VISIBLE_DEVICES=0 timeout -s INT ${TEST_LIMIT:-250} python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
    -p no:warnings -m gpu tests > /root/sc/gpu_tests.log 2>&1 &
  run 1b_w1 1 --recipes nam-1b --worlds 1 --master-port 31000
  run 125m_w1 2 --recipes nam-125m --worlds 1 --master-port 31100
  wait; echo "round I done at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error" /root/sc/gpu_tests.log | tail -n 15
fi
if has J; then run 125m_w4_nr 0,1,2,3 --recipes nam-125m --worlds 4 $NR --master-port 31200; wait; echo "round J done at ${SECONDS}s"; fi
if has F; then run 1b_w4_nrc 0,1,2,3 --recipes nam-1b --worlds 4 $NRC --master-port 30500; wait; echo "round F done at ${SECONDS}s"; fi
if has G; then run 1b_w4_nr 0,1,2,3 --recipes nam-1b --worlds 4 $NR --master-port 30600; wait; echo "round G done at ${SECONDS}s"; fi
if has H; then
  run 125m_w1 0 --recipes nam-125m --worlds 1 --master-port 30700
  run 125m_w2_nrc 2,3 --recipes nam-125m --worlds 2 $NRC --master-port 30800
  wait; echo "round H done at ${SECONDS}s"
  run 125m_w4_nrc 0,1,2,3 --recipes nam-125m --worlds 4 $NRC --master-port 30900; wait; echo "round H4 done at ${SECONDS}s"
fi
# prof GPUS WORLD PORT: PROF_RECIPE (default nam-125m) profiled at steps 10-12 on
# rank 0 (profile.txt: GPU busy, compute vs communication-only time, kernels;
# PROF_KERNELS_ONLY=1: the kernels alone, the host not slowed by recording its operators)
PR=${PROF_RECIPE:-nam-125m}
prof() {
  local mb; mb=$(python3 -c "import megacpp; print(megacpp.load_recipe('$PR').policy.micro_batch)")
  CUDA_VISIBLE_DEVICES=$1 python3 -m torch.distributed.run --nproc_per_node "$2" --master_port "$3" \
    -m megacpp train --recipe $PR --data /root/cpp-125m --out /root/sc/prof-w$2 --quiet \
    --max-steps 14 --profile 10:13 ${PROF_KERNELS_ONLY:+--profile-kernels-only} --set policy.parallel.data="$2" \
    --set policy.parallel.sharding=$([ "$2" = 1 ] && echo none || echo fsdp2) \
    --set policy.global_batch=$((mb * $2)) --set policy.eval_batches=0 > /root/sc/prof-w$2.log 2>&1
  cp /root/sc/prof-w$2/profile.txt "$OUT/profile_${PR}_w$2.txt"
  cp /root/sc/prof-w$2/profile_kernels.json "$OUT/profile_${PR}_w$2.json" 2>/dev/null
}
if has P; then  # PROF_WORLD (2: beside the 1-GPU profile; 4: after it)
  PW=${PROF_WORLD:-2}
  if [ "$PW" = 2 ]; then prof 0 1 30300 & prof 2,3 2 30400 & wait
  else prof 0 1 30300; prof 0,1,2,3 "$PW" 30400; fi
  head -n 1 "$OUT"/profile_*_w*.txt; echo "round P done at ${SECONDS}s"
fi
if has K; then  # one card each: the CUDA tests, nam-1b's 1-GPU baseline, PROF_RECIPE's 1-GPU profile, the conv sweep
  CUDA_VISIBLE_DEVICES=0 timeout -s INT ${TEST_LIMIT:-250} python3 -m pytest -q -rf --tb=short -p no:cacheprovider \
    -p no:warnings -m gpu tests > /root/sc/gpu_tests.log 2>&1 &
  run 1b_w1 1 --recipes nam-1b --worlds 1 --master-port 31000
  prof 2 1 31100 &
  CUDA_VISIBLE_DEVICES=3 timeout 280 python3 benchmarks/conv_tune.py --json $OUT/conv_tune.json > /root/sc/conv_tune.log 2>&1 &
  wait; echo "round K done at ${SECONDS}s"; grep -E "passed|failed|^FAILED|Error" /root/sc/gpu_tests.log | tail -n 15
  tail -n 12 /root/sc/conv_tune.log
fi
if has Q; then prof 0,1,2,3 4 31200; sed -n 1,12p "$OUT/profile_${PR}_w4.txt"; echo "round Q done at ${SECONDS}s"; fi
if has R; then  # nam-1b at 4 GPUs with every byte-saving knob: bf16 GEMM gather, bf16 gradient reduce
  run 1b_w4_nrcr 0,1,2,3 --recipes nam-1b --worlds 4 $NRC --set policy.parallel.reduce=compute \
    --tag nr+compute+bf16-reduce --master-port 31300
  wait; echo "round R done at ${SECONDS}s"
fi
# micro batch 16 (twice the compute per gathered byte): the baselines at both micro
# batches and 2 GPUs side by side, then 4 GPUs plain, with the bf16 knobs, and with
# two layers per FSDP2 group as well
B16="--recipes nam-1b --micro-batch 16"
RC="--set policy.parallel.gather=compute --set policy.parallel.reduce=compute"
if has M; then
  run 1b_w1 0 --recipes nam-1b --worlds 1 --master-port 31400
  run 1b16_w1 1 $B16 --worlds 1 --master-port 31500
  run 1b16_w2 2,3 $B16 --worlds 2 $NR --master-port 31600
  wait; echo "round M done at ${SECONDS}s"
fi
if has N; then run 1b16_w4 0,1,2,3 $B16 --worlds 4 $NR --master-port 31700; wait; echo "round N done at ${SECONDS}s"; fi
if has O; then run 1b16_w4_rc 0,1,2,3 $B16 --worlds 4 $NR $RC --tag nr+compute+bf16-reduce --master-port 31800
  wait; echo "round O done at ${SECONDS}s"; fi
if has U; then run 1b16_w4_rcg 0,1,2,3 $B16 --worlds 4 $NR $RC --set policy.parallel.group_layers=2 \
  --tag nr+compute+bf16-reduce+2layers --master-port 31900; wait; echo "round U done at ${SECONDS}s"; fi
grep -h -A3 "^recipe" /root/sc/*.log | grep -v "^--" | sort -u | head -n 40
tar czf $OUT/sc_logs.tar.gz -C /root/sc $(cd /root/sc && ls *.log)
python3 benchmarks/scaling.py --data none --merge $OUT/sc_*.json --json $OUT/scaling_table.json
