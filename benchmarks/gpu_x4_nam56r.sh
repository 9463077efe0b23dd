#!/usr/bin/env bash
# nam56r (5.6B) on 4 GPUs with FSDP2 at sequence 4096 on real C++ text
# (issue 11), one call: 60 steps, the first 10 counted as warm-up
# (compile, allocator); tokens/s per GPU, MFU by the model-FLOPs counter
# and peak memory per GPU from the run's metrics. Global batch 16 (micro
# batch 4 per GPU, no accumulation): the seed's 64 would only repeat the
# same step 4 times. Full activation checkpointing on every family.
# Carry .whl-min (liger-kernel, tomli-w) and .gpudata/cpp-56r, built on the
# CPU machine with
#   megacpp data prepare --recipe nam56r --sources system debian:libboost1.81-dev \
#       debian:gcc-12-source --max-bytes 41943040 --out .gpudata/cpp-56r
#   bash benchmarks/gpu_x4_nam56r.sh            (MB=2 for micro batch 2, COMPILE=none)
# On 8 GPUs, the seed's own layout (issue 11: micro batch 4, global batch 64,
# so two micro-batches accumulated per step), compared with its 29.2% MFU:
#   NPROC=8 GLOBAL=64 bash benchmarks/gpu_x4_nam56r.sh
source benchmarks/gpu_session.sh
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTORCH_ALLOC_CONF=expandable_segments:True
RECIPE=${RECIPE:-nam56r}; NPROC=${NPROC:-4}; MB=${MB:-4}; STEPS=${STEPS:-60}; SKIP=${SKIP:-10}; COMPILE=${COMPILE:-default}
GLOBAL=${GLOBAL:-}  # default: micro batch x GPUs (no accumulation)
DATA=${DATA:-.gpudata/cpp-56r}; RUN=${RUN:-/root/megacpp-runs/$RECIPE-x$NPROC}
LIMIT=${LIMIT:-540}
rm -rf "$RUN"; mkdir -p "$(dirname "$RUN")"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
launch() {  # $1: micro batch, $2: time limit
  rm -rf "$RUN"
  timeout "$2" python3 -m torch.distributed.run --nproc_per_node "$NPROC" --master_port 29950 \
    -m megacpp train --recipe "$RECIPE" --data "$DATA" --out "$RUN" --quiet --max-steps "$STEPS" \
    --set policy.parallel.data="$NPROC" --set policy.parallel.sharding=fsdp2 \
    --set policy.micro_batch="$1" --set policy.global_batch=${GLOBAL:-$(($1 * NPROC))} \
    --set policy.eval_batches=0 --set policy.log_interval=1 --set policy.checkpoint_interval=1000000 \
    --set policy.compile.mode="$COMPILE" \
    $(for f in A E M R F; do echo --set policy.activation_checkpointing.$f=full; done) \
    > "$RUN.log" 2>&1
}
launch "$MB" "$LIMIT"
rc=$?
if [ $rc != 0 ] && grep -q "OutOfMemoryError\|out of memory" "$RUN.log" && (( MB > 1 && SECONDS < LIMIT / 2 )); then
  echo "micro batch $MB ran out of memory after ${SECONDS}s; again at $((MB / 2))"
  grep -m1 -i "out of memory" "$RUN.log" | cut -c1-300
  MB=$((MB / 2)); launch "$MB" $((LIMIT - SECONDS - 20)); rc=$?
fi
echo "rc=$rc (micro batch $MB) after ${SECONDS}s"; grep -v "^\s*$" "$RUN.log" | grep -iv "warn" | tail -n 8
cp "$RUN/run.json" "$OUT/nam56r_run.json" 2>/dev/null
cp "$RUN/metrics.jsonl" "$OUT/nam56r_metrics.jsonl" 2>/dev/null
python3 - "$RUN" "$SKIP" "$NPROC" <<'PY'
import json, statistics, sys, pathlib
run, skip, n = pathlib.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
p = run / "metrics.jsonl"
if not p.exists():
    sys.exit("no metrics")
tr = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
tr = [r for r in tr if r.get("kind") == "train"]
m = tr[skip:]
if not m:
    sys.exit(f"only {len(tr)} steps ran")
tps = statistics.median(r["tokens_per_s"] for r in m)
mfus = [r["mfu"] for r in m if r.get("mfu") is not None]
mfu = f"{statistics.median(mfus) * 100:.1f}%" if mfus else "n/a (no device peak)"
print(f"{run.name}: {len(tr)} steps, {len(m)} measured; tokens/s {tps:,.0f} ({tps / n:,.0f} per GPU); "
      f"MFU {mfu}; peak {max(r['peak_memory_gib'] for r in m):.1f} GiB (rank 0); "
      f"loss {tr[0]['loss']:.3f} -> {tr[-1]['loss']:.3f}")
PY
