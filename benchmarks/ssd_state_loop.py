"""The Triton SSD's state scans, nested loops against one loop (issue 8).

At one layer's shape (nam-125m's by default), times `_state_fwd_kernel` /
`_state_bwd_kernel` (STATE_LOOP "nested", at TUNED_NESTED's launch) against
the `_flat` kernels ("flat") at TUNED's launch and at each --bk x --stages
variant, each kernel's own time from torch.profiler; every flat variant's
outputs and gradients are checked against the nested launch's (largest
relative difference printed; > --tol fails the script). Ends with a table.

    python benchmarks/ssd_state_loop.py [--shape 16,2048,24,64,1,128] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from megacpp.ops.ssd import triton_ssd as T
from ssd_tune import fwd_bwd, make_inputs
from tune_util import kernel_ms, rel

NAMES = {("nested", "state_fwd"): "_state_fwd_kernel", ("nested", "state_bwd"): "_state_bwd_kernel",
         ("flat", "state_fwd"): "_state_fwd_flat_kernel", ("flat", "state_bwd"): "_state_bwd_flat_kernel"}


def run(inputs, loop: str, launch: dict, reps: int):
    T.STATE_LOOP = loop
    for k in ("state_fwd", "state_bwd"):
        T.LAUNCH[k] = dict(launch)
    try:
        out = fwd_bwd(inputs)
        ms = {k: kernel_ms(lambda: fwd_bwd(inputs), NAMES[(loop, k)], reps) for k in ("state_fwd", "state_bwd")}
    finally:
        for k in ("state_fwd", "state_bwd"):
            T.LAUNCH[k] = {}
    return out, ms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="16,2048,24,64,1,128", help="batch,seqlen,heads,headdim,groups,state")
    ap.add_argument("--bk", default="32,64,128")
    ap.add_argument("--stages", default="1,2,3,4")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tol", type=float, default=2e-3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    inputs = make_inputs(shape)
    ref, base = run(inputs, "nested", {}, args.reps)
    rows = [{"loop": "nested", "launch": "tuned", **base, "err": 0.0}]
    variants = [{}] + [{"BK": bk, "num_stages": st} for bk in map(int, args.bk.split(","))
                       for st in map(int, args.stages.split(","))]
    bad = 0
    for v in variants:
        try:
            out, ms = run(inputs, "flat", v, args.reps)
        except Exception as e:  # noqa: BLE001 - a launch that does not compile is reported, not fatal
            rows.append({"loop": "flat", "launch": v or "tuned", "note": f"{type(e).__name__}: {str(e)[:80]}"})
            continue
        err = max(rel(o, r) for o, r in zip(out, ref))
        bad += err > args.tol
        rows.append({"loop": "flat", "launch": v or "tuned", **ms, "err": err})
    print(f"SSD state scans at {shape} (bf16, chunk 128), {torch.cuda.get_device_name()}: ms a call")
    print(f"{'loop':7} {'launch':32} {'state_fwd':>9} {'state_bwd':>9} {'rel err':>9}")
    for r in rows:
        if "note" in r:
            print(f"{r['loop']:7} {str(r['launch']):32} {r['note']}")
            continue
        print(f"{r['loop']:7} {str(r['launch']):32} {r['state_fwd']:9.4f} {r['state_bwd']:9.4f} {r['err']:9.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1,
                      default=str)
    if bad:
        print(f"FAIL: {bad} flat launch(es) differ from the nested one by more than {args.tol}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
