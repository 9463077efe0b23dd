"""Print two or more runs' training losses side by side, and the largest gap.

    python benchmarks/compare_train_losses.py RUN_DIR RUN_DIR [...] [--steps 0,9,19,29]

Each RUN_DIR is a `megacpp train --out` directory (its metrics.jsonl).
Used to check that a compile mode (CUDA graphs) trains the same as the default.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def losses(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "train":
            out[r["step"]] = r
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--steps", default="")
    args = ap.parse_args(argv)
    runs = {str(r): losses(r) for r in args.runs}
    common = sorted(set.intersection(*(set(v) for v in runs.values())))
    show = [int(s) for s in args.steps.split(",") if s] or common[:: max(1, len(common) // 6)] + common[-1:]
    print("step  " + "  ".join(f"{Path(k).name:>14}" for k in runs))
    for s in sorted(set(show) & set(common)):
        print(f"{s:4d}  " + "  ".join(f"{v[s]['loss']:14.5f}" for v in runs.values()))
    base = next(iter(runs.values()))
    for name, v in list(runs.items())[1:]:
        gap = max(abs(v[s]["loss"] - base[s]["loss"]) for s in common)
        print(f"largest |loss - {Path(next(iter(runs))).name}| over {len(common)} steps, {Path(name).name}: {gap:.2e}")
    for name, v in runs.items():
        tps = [r.get("tokens_per_s") for s, r in v.items() if s >= 10 and r.get("tokens_per_s")]
        if tps:
            print(f"{Path(name).name}: median tokens/s over steps >= 10: {statistics.median(tps):,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
