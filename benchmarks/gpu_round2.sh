#!/usr/bin/env bash
# Round 2 on one GPU (one call, < 10 min): nam-125m trains on the carried
# C++ snapshot (system headers + boost + gcc sources) under a time limit,
# then step benchmarks of nam-125m and dense-125m, then activation
# checkpointing memory if time is left. Files for BENCHMARKS.md go to $OUT.
source benchmarks/gpu_session.sh
set -o pipefail
RUN=runs/gpu-nam-125m
rm -rf "$RUN"
timeout 330 python3 -m megacpp train --recipe nam-125m --data .gpudata/cpp-125m --out "$RUN" --quiet \
  --time-limit "${TRAIN_SECONDS:-270}" --set policy.steps=1200 --set policy.eval_interval=50 \
  --set policy.eval_batches=8 --set policy.checkpoint_interval=100000 --set policy.log_interval=25 2>&1 | tail -n 4
python3 -m megacpp report "$RUN" --out "$OUT/report" > /dev/null 2>&1 || echo "report failed"
cp "$RUN/metrics.jsonl" "$RUN/run.json" "$OUT/" 2>/dev/null
python3 benchmarks/run_summary.py "$RUN"
for r in nam-125m dense-125m; do
  fam=""; [ "$r" = dense-125m ] && fam="--no-family-times"
  timeout 150 python3 -m megacpp bench --recipe $r --steps 10 --warmup 4 $fam --json > $OUT/bench_$r.json 2> $OUT/bench_$r.err
  echo "bench $r rc=$?"; tail -n 2 $OUT/bench_$r.err
  python3 -c "import json; d=json.load(open('$OUT/bench_$r.json')); print(d['recipe'], round(d['tokens_per_s']), 'tok/s', round((d['mfu'] or 0)*100,1), '% MFU', round(d['peak_memory_gib'],1), 'GiB', {k: round(v,1) for k,v in d['family_ms'].items()})" 2>/dev/null
done
if (( SECONDS < 470 )); then
  timeout 100 python3 -m megacpp bench --recipe nam-125m --steps 5 --warmup 3 --no-family-times \
    $(for f in A M R E F; do echo --set policy.activation_checkpointing.$f=full; done) 2>&1 | sed -n 1,3p
fi
echo "elapsed ${SECONDS}s"
