"""Activation checkpointing per family: peak memory and step time, measured.

For one recipe, runs `megacpp.train.bench.run_bench` once per policy —
none, selective (every family's sublayer recomputed), full (whole layers) and
one mixed policy (full for Mamba/recurrent/MoE, none for attention/MLP) — in
one process, on the same synthetic packed batch, and prints a table.

    python benchmarks/ac_memory.py --recipe nam-125m [--steps 6] [--compile none] [--json OUT]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys

import torch

import megacpp
from megacpp.train.bench import run_bench

POLICIES = {
    "none": dict.fromkeys("AMREF", "none"),
    "selective": dict.fromkeys("AMREF", "selective"),
    "full": dict.fromkeys("AMREF", "full"),
    "mixed (full M/R/E)": {"A": "none", "F": "none", "M": "full", "R": "full", "E": "full"},
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="nam-125m")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", default="none", help="policy.compile.mode for these runs")
    ap.add_argument("--device")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, pol in POLICIES.items():
        sets = args.sets + [f"policy.compile.mode={args.compile}"]
        sets += [f"policy.activation_checkpointing.{k}={v}" for k, v in pol.items()]
        r = run_bench(megacpp.load_recipe(args.recipe, sets), steps=args.steps, warmup=2,
                      device=args.device, family_times=False)
        rows.append({"policy": name, "peak_gib": r.peak_memory_gib, "step_ms": r.step_ms_median,
                     "tokens_per_s": r.tokens_per_s, "device": r.device, "batch": r.batch, "seq": r.seq_len})
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print(f"# {args.recipe} on {rows[0]['device']}, batch {rows[0]['batch']} x {rows[0]['seq']}, compile {args.compile}")
    print(f"{'policy':20} {'peak GiB':>9} {'step ms':>9} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['policy']:20} {r['peak_gib']:>9.2f} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10,.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
