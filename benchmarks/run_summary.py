"""One run directory in a few lines: steps, tokens, wall time, why it ended,
median tokens/s, peak memory, patch backends and the val bits-per-byte curve.

    python3 benchmarks/run_summary.py RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run: str) -> int:
    run_dir = Path(run)
    m = json.loads((run_dir / "run.json").read_text())
    o = m["outcome"]
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    tr = sorted(r["tokens_per_s"] for r in recs if r["kind"] == "train")
    val = [(r["step"], round(r["bpb"], 4)) for r in recs if r["kind"] == "val"]
    print("train:", o["steps"], "steps", o["tokens"], "tokens", o["wall_seconds"], "s, end", o["end_reason"],
          "median tok/s", round(tr[len(tr) // 2]) if tr else None,
          "peak GiB", round((o["peak_memory_bytes"] or 0) / 2**30, 1))
    print("patches:", [(p["name"], p["backend"]) for p in m["patches"]])
    print("val bpb:", val)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
