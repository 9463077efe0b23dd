"""Sweep the Triton SSD kernels' launch parameters on this GPU (issue 8).

For each kernel of ops/ssd/triton_ssd.py, coordinate descent over its block
sizes, num_warps and num_stages (the others held at their best so far), at
one layer's shape; every variant's outputs (y, final state, dx, ddt, dA, dB,
dC, dD) are checked against the default launch's, and a variant that
differs by more than --tol (relative norm) or fails to compile is dropped.
Each kernel's own time comes from torch.profiler (train/kernel_profile.py).
Then the chosen set and the defaults are timed end to end (fwd + bwd, CUDA
events) at every --shapes entry, and a table is printed last.

    python benchmarks/ssd_tune.py [--tune-shape 8,2048,24,64,1,128] \
        [--shapes 8,2048,24,64,1,128 16,2048,24,64,1,128 8,2048,64,64,1,128] [--json OUT]

Shapes are batch,seqlen,heads,headdim,groups,state (mamba2-130m's layer,
nam-125m's, nam-1b's by default); chunk 128, bf16, D on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from megacpp.ops.ssd import triton_ssd as T
from tune_util import coordinate_descent, kernel_ms, rel

OPTIONS = {
    "cb": {"BM": [32, 64, 128], "BN": [32, 64, 128], "BK": [32, 64, 128], "num_warps": [2, 4, 8],
           "num_stages": [1, 2, 3, 4]},
    "state_fwd": {"BP": [32, 64], "BN": [32, 64, 128], "BK": [16, 32, 64, 128], "num_warps": [2, 4, 8],
                  "num_stages": [1, 2, 3, 4]},
    "scan_fwd": {"BM": [32, 64, 128], "BP": [32, 64], "BN": [32, 64, 128], "BK": [16, 32, 64, 128],
                 "num_warps": [2, 4, 8], "num_stages": [1, 2, 3, 4]},
    "state_bwd": {"BP": [32, 64], "BN": [32, 64, 128], "BK": [16, 32, 64, 128], "num_warps": [2, 4, 8],
                  "num_stages": [1, 2, 3, 4]},
    "dx": {"BJ": [32, 64, 128], "BI": [16, 32, 64, 128], "BN": [32, 64, 128], "num_warps": [4, 8],
           "num_stages": [1, 2, 3, 4]},
    "dcb": {"BI": [16, 32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
    "dbc": {"BR": [16, 32, 64], "BK": [16, 32, 64], "num_warps": [4, 8], "num_stages": [1, 2, 3]},
}
KERNEL_NAME = {k: f"_{k}_kernel" for k in OPTIONS}


def parse_shape(s: str) -> tuple[int, ...]:
    v = tuple(int(x) for x in s.split(","))
    if len(v) != 6:
        raise SystemExit(f"shape {s!r}: expected batch,seqlen,heads,headdim,groups,state")
    return v


def make_inputs(shape, seed=0):
    b, l, h, p, g, n = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"

    def r(*s, dtype=torch.bfloat16, scale=1.0):
        return (torch.randn(*s, generator=gen, device=dev) * scale).to(dtype)

    x = r(b, l, h, p)
    dt = torch.nn.functional.softplus(r(b, l, h, dtype=torch.float32) - 2.0)
    A = -torch.exp(r(h, dtype=torch.float32, scale=0.5))
    B, C = r(b, l, g, n, scale=0.3), r(b, l, g, n, scale=0.3)
    D = r(h, dtype=torch.float32)
    dy = r(b, l, h, p)
    return x, dt, A, B, C, D, dy


def fwd_bwd(inputs, chunk=128):
    x, dt, A, B, C, D, dy = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, dt, A, B, C, D)]
    y, final = T.ssd_triton(*leaves[:5], chunk, D=leaves[5])
    y.backward(dy)
    return [y.detach(), final.detach()] + [t.grad for t in leaves]


def kernel_ms_of(inputs, name, reps=5) -> float:
    return kernel_ms(lambda: fwd_bwd(inputs), KERNEL_NAME[name], reps)


def total_ms(inputs, reps=20) -> float:
    for _ in range(3):
        fwd_bwd(inputs)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fwd_bwd(inputs)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def try_config(inputs, ref, name, cfg, tol):
    """(kernel ms, worst rel. error) of `cfg` for kernel `name`, or (None, reason)."""
    T.LAUNCH[name] = dict(cfg)
    try:
        out = fwd_bwd(inputs)
        torch.cuda.synchronize()
        err = max(rel(o, r) for o, r in zip(out, ref))
        if not err <= tol:
            return None, f"mismatch {err:.2e}"
        return kernel_ms_of(inputs, name), err
    except Exception as e:  # noqa: BLE001 - a variant that does not compile or launch is dropped
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    finally:
        T.LAUNCH[name] = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune-shape", default="8,2048,24,64,1,128")
    ap.add_argument("--shapes", nargs="+", default=["8,2048,24,64,1,128", "16,2048,24,64,1,128",
                                                     "8,2048,64,64,1,128"])
    ap.add_argument("--kernels", nargs="+", default=list(OPTIONS))
    ap.add_argument("--tol", type=float, default=2e-3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("ssd_tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    for k in T.KERNELS:  # start from the plain defaults, not an earlier sweep's choice
        T.TUNED[k] = {}
    inputs = make_inputs(parse_shape(args.tune_shape))
    ref = fwd_bwd(inputs)
    log: list = []
    chosen = {}
    for name in args.kernels:
        res = coordinate_descent(OPTIONS[name], lambda cfg: try_config(inputs, ref, name, cfg, args.tol),
                                 log, name)
        chosen[name] = res
        if res["ms"] is None:
            print(f"{name:10} the default launch failed: {log[-1]['note']}", flush=True)
            continue
        print(f"{name:10} default {res['default_ms']:7.3f} ms -> {res['ms']:7.3f} ms  {res['config']}", flush=True)
    rows = []
    for s in args.shapes:
        shape = parse_shape(s)
        inp = make_inputs(shape, seed=1)
        for k in T.KERNELS:
            T.LAUNCH[k] = {}
        base_out = fwd_bwd(inp)
        base = total_ms(inp)
        for k, v in chosen.items():
            T.LAUNCH[k] = dict(v["config"])
        out = fwd_bwd(inp)
        err = max(rel(o, r) for o, r in zip(out, base_out))
        tuned = total_ms(inp)
        for k in T.KERNELS:
            T.LAUNCH[k] = {}
        rows.append({"shape": s, "default_ms": base, "tuned_ms": tuned, "speedup": base / tuned, "max_rel_err": err})
    print(f"\nSSD fwd+bwd (bf16, chunk 128) on {torch.cuda.get_device_name()}; tuned at {args.tune_shape}")
    print(f"{'shape b,l,h,p,g,n':24} {'default ms':>10} {'tuned ms':>9} {'speedup':>8} {'max rel err':>12}")
    for r in rows:
        print(f"{r['shape']:24} {r['default_ms']:10.3f} {r['tuned_ms']:9.3f} {r['speedup']:8.2f} {r['max_rel_err']:12.1e}")
    print("TUNED = " + json.dumps({k: v["config"] for k, v in chosen.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tune_shape": args.tune_shape,
                       "chosen": chosen, "rows": rows, "log": log}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
