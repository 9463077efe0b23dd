#!/usr/bin/env bash
# nam-125m for 20+ minutes on one GPU (issue 5), across three calls of the
# device tool on one warm machine (each call may run at most 10 minutes):
#
#   bash benchmarks/gpu_train20.sh start    # wheels, start training detached, GPU tests meanwhile
#   bash benchmarks/gpu_train20.sh wait     # follow the run for up to ~9.5 more minutes
#   bash benchmarks/gpu_train20.sh finish   # wait for the end, report, files to $OUT
#
# The training process is started with setsid so it outlives the first
# call; it stops itself at --time-limit (20+ min of wall time in the
# process) and saves a final checkpoint. Data and runs live outside the
# repository copy, which the next call replaces. The run has the card to
# itself during `start`; with SIDE_JOBS=1, `wait` then puts the CUDA tests,
# the two kernel checks and the four issue-10 precision curves (one process
# per mode) beside it, as the third session did on 2026-11-27 (the run fell
# from 86k to 17k tokens/s while the curves ran), and `finish` collects them. Start it in the FIRST call of a fresh machine:
# the machine goes back 30 minutes after it was asked for, start included.
# Carry: a wheel dir (liger-kernel, tomli-w, pytest, torchao) and
# .gpudata/cpp-125m-xl, the snapshot built on the CPU machine with
#   megacpp data prepare --recipe nam-125m --sources system debian:libboost1.81-dev \
#       debian:gcc-12-source --max-bytes 117440512 --out .gpudata/cpp-125m-xl
source benchmarks/gpu_session.sh
RUN=${RUN:-/root/megacpp-runs/nam-125m-20min}
SRC_DATA=${DATA:-.gpudata/cpp-125m-xl}
DATA=/root/data/$(basename "$SRC_DATA")
LIMIT=${LIMIT:-1215}
CURVES="python3 benchmarks/precision_bench.py --part curves --steps 500 --micro-batch 8 --set policy.global_batch=8 --data $DATA"
phase=${1:-start}

progress() {
  python3 - "$RUN" <<'PY'
import json, sys, pathlib
p = pathlib.Path(sys.argv[1]) / "metrics.jsonl"
if not p.exists():
    print("no metrics yet"); sys.exit()
recs = [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
tr = [r for r in recs if r.get("kind") == "train"]
va = [r for r in recs if r.get("kind") == "val"]
if tr:
    r = tr[-1]
    print(f"step {r['step']} loss {r['loss']:.4f} tok/s {r['tokens_per_s']:,.0f}", end="")
if va:
    print(f" | val bpb {va[0]['bpb']:.3f} -> {va[-1]['bpb']:.3f} (step {va[-1]['step']})", end="")
print()
PY
}

follow() {  # $1: seconds to follow at most
  local until=$((SECONDS + $1))
  while (( SECONDS < until )) && pgrep -f "[m]egacpp train --recipe nam-125m" > /dev/null; do
    sleep 30; progress
  done
}

case $phase in
start)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  rm -rf "$RUN"; mkdir -p "$(dirname "$RUN")" /root/data
  cp -r "$SRC_DATA" /root/data/
  echo "MEGACPP_SSD=${MEGACPP_SSD:-auto}" > /root/ssd_choice
  setsid nohup python3 -m megacpp train --recipe nam-125m --data "$DATA" --out "$RUN" \
    --time-limit "$LIMIT" --set policy.steps=3600 --set policy.eval_interval=100 \
    --set policy.eval_batches=8 --set policy.checkpoint_interval=100000 --set policy.log_interval=25 \
    > "$RUN.log" 2>&1 < /dev/null &
  follow $((560 - SECONDS))
  tail -n 3 "$RUN.log"
  ;;
wait)
  if [ "${SIDE_JOBS:-0}" = 1 ]; then
    for m in bf16 fp16 fp8 nvfp4_emulated; do
      setsid nohup $CURVES --modes $m --work /root/pw_$m --json /root/curves_$m.json > /root/curves_$m.log 2>&1 < /dev/null &
    done
    mkdir -p /root/side
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests > /root/side/gpu_tests.log 2>&1; tail -n 3 /root/side/gpu_tests.log
    timeout 100 python3 benchmarks/ssd_kernel_check.py > /root/side/ssd_check.log 2>&1; echo "ssd check rc $?"
    timeout 60 python3 benchmarks/delta_rule_kernel_check.py > /root/side/delta_check.log 2>&1; echo "delta check rc $?"
  fi
  follow $((560 - SECONDS))
  ;;
finish)
  while pgrep -f "[m]egacpp train --recipe nam-125m" > /dev/null && (( SECONDS < 240 )); do sleep 5; done
  while pgrep -f "[p]recision_bench.py" > /dev/null && (( SECONDS < 420 )); do sleep 5; done
  pkill -f "[p]recision_bench.py"
  tail -n 4 "$RUN.log"
  python3 -m megacpp report "$RUN" --out /root/report > /root/report.log 2>&1 || { echo "report failed"; tail -n 5 /root/report.log; }
  python3 benchmarks/run_summary.py "$RUN"
  rm -rf /root/pack; mkdir -p /root/pack
  cp -r /root/report "$RUN/run.json" "$RUN/metrics.jsonl" "$RUN.log" /root/pack/
  cp -r /root/side /root/curves_* /root/pack/ 2>/dev/null
  python3 - <<'PY'
import glob, json, sys
sys.path.insert(0, "benchmarks")
from precision_bench import curves_table
res = {}
for f in sorted(glob.glob("/root/curves_*.json")):
    res.update(json.load(open(f)))
if res:
    print(curves_table(res))
PY
  tar czf "$OUT/train20.tar.gz" -C /root pack   # one file back: report, manifest, metrics, logs, curves
  ;;
esac
