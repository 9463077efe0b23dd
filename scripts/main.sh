#!/usr/bin/env bash
# The main job on the built-in default, from a fresh clone:
#   set up -> prepare the default `system` C++ snapshot (pinned headers of this
#   machine) -> train nam-tiny on the CPU -> evaluate -> sample C++ -> report.
# RECIPE, DATA and RUN override the defaults; extra arguments go to `train`
# (e.g. --set policy.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
M=.venv/bin/megacpp
RECIPE=${RECIPE:-nam-tiny}
DATA=${DATA:-data/system-$RECIPE}
RUN=${RUN:-runs/$RECIPE-$(date +%Y%m%d-%H%M%S)}

if [ ! -f "$DATA/snapshot.json" ]; then
  $M data prepare --recipe "$RECIPE" --out "$DATA"
fi
$M describe --recipe "$RECIPE" | tail -n 4
$M train --recipe "$RECIPE" --data "$DATA" --out "$RUN" "$@"
$M eval "$RUN" --split test --batches 40
echo "--- sample ---"
$M generate "$RUN" --prompt $'template <typename T>\n' --max-tokens 120 --temperature 0.7
echo "--- end of sample ---"
$M report "$RUN" >/dev/null
cat "$RUN/report/summary.md"
