"""Sweep the Triton causal conv kernels' launch parameters on this GPU (issue 8).

For each kernel of ops/causal_conv/triton_conv.py (fwd, dpre, dx),
coordinate descent over BT, BC, num_warps and num_stages at one conv's
shape (benchmarks/tune_util.py); every variant's outputs (y, dx, d(weight),
d(bias)) are checked against the default launch's. Then the chosen set and
the defaults are timed end to end (fwd + bwd, CUDA events) at every
--shapes entry, and a table is printed last with the TUNED line to paste.

    python benchmarks/conv_tune.py [--tune-shape 8,2048,1792,4] [--shapes ...] [--json OUT]

Shapes are batch,seqlen,channels,K: mamba2-130m's / nam-125m's M conv
(1792 channels, bias), nam-125m's R convs (768, no bias) by default;
packed rows (random documents), bf16, SiLU fused.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from megacpp.ops.causal_conv import triton_conv as T
from tune_util import coordinate_descent, kernel_ms, rel

OPTIONS = {
    name: {"BT": [16, 32, 64, 128], "BC": [32, 64, 128, 256], "num_warps": [1, 2, 4, 8],
           "num_stages": [1, 2, 3]}
    for name in T.KERNELS
}
KERNEL_NAME = {"fwd": "_conv_fwd_kernel", "dpre": "_conv_dpre_kernel", "dx": "_conv_dx_kernel"}


def parse_shape(s: str) -> tuple[int, ...]:
    v = tuple(int(x) for x in s.split(","))
    if len(v) != 4:
        raise SystemExit(f"shape {s!r}: expected batch,seqlen,channels,K")
    return v


def make_inputs(shape, bias: bool, seed=0):
    b, l, c, K = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(b, l, c, generator=gen, device="cuda").to(torch.bfloat16)
    w = torch.randn(c, 1, K, generator=gen, device="cuda") * 0.5
    bb = torch.randn(c, generator=gen, device="cuda") * 0.1 if bias else None
    starts = torch.rand(b, l, generator=gen, device="cuda") < 1.0 / 1024
    starts[:, 0] = True
    doc = (starts.long().cumsum(1) - 1).int()
    dy = torch.randn(b, l, c, generator=gen, device="cuda").to(torch.bfloat16)
    return x, w, bb, doc, dy


def fwd_bwd(inputs):
    x, w, bb, doc, dy = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, bb) if t is not None]
    y = T.causal_conv1d_triton(leaves[0], leaves[1], leaves[2] if bb is not None else None, doc, "silu")
    y.backward(dy)
    return [y.detach()] + [t.grad for t in leaves]


def try_config(inputs, ref, name, cfg, tol):
    T.LAUNCH[name] = dict(cfg)
    try:
        out = fwd_bwd(inputs)
        torch.cuda.synchronize()
        err = max(rel(o, r) for o, r in zip(out, ref))
        if not err <= tol:
            return None, f"mismatch {err:.2e}"
        return kernel_ms(lambda: fwd_bwd(inputs), KERNEL_NAME[name]), err
    except Exception as e:  # noqa: BLE001 - a variant that does not compile or launch is dropped
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    finally:
        T.LAUNCH[name] = {}


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune-shape", default="8,2048,1792,4")
    ap.add_argument("--shapes", nargs="+", default=["8,2048,1792,4", "16,2048,1792,4", "16,2048,768,4"])
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("conv_tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    for k in T.KERNELS:  # start from DEFAULT, not an earlier sweep's choice
        T.TUNED[k] = {}
    inputs = make_inputs(parse_shape(args.tune_shape), bias=True)
    ref = fwd_bwd(inputs)
    log: list = []
    chosen = {}
    for name in T.KERNELS:
        res = coordinate_descent(OPTIONS[name], lambda cfg: try_config(inputs, ref, name, cfg, args.tol),
                                 log, name)
        chosen[name] = res
        if res["ms"] is None:
            print(f"{name:5} the default launch failed: {log[-1]['note']}", flush=True)
            continue
        print(f"{name:5} default {res['default_ms']:7.3f} ms -> {res['ms']:7.3f} ms  {res['config']}", flush=True)
    rows = []
    for s in args.shapes:
        shape = parse_shape(s)
        inp = make_inputs(shape, bias=shape[2] != 768, seed=1)
        base_out = fwd_bwd(inp)
        base = total_ms(inp)
        for k, v in chosen.items():
            T.LAUNCH[k] = dict(v["config"])
        err = max(rel(o, r) for o, r in zip(fwd_bwd(inp), base_out))
        tuned = total_ms(inp)
        for k in T.KERNELS:
            T.LAUNCH[k] = {}
        rows.append({"shape": s, "default_ms": base, "tuned_ms": tuned, "speedup": base / tuned,
                     "max_rel_err": err})
    print(f"\ncausal conv fwd+bwd (bf16, packed, SiLU) on {torch.cuda.get_device_name()}; tuned at {args.tune_shape}")
    print(f"{'shape b,l,c,K':18} {'default ms':>10} {'tuned ms':>9} {'speedup':>8} {'max rel err':>12}")
    for r in rows:
        print(f"{r['shape']:18} {r['default_ms']:10.3f} {r['tuned_ms']:9.3f} {r['speedup']:8.2f} {r['max_rel_err']:12.1e}")
    print("TUNED = " + json.dumps({k: v["config"] for k, v in chosen.items()}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tune_shape": args.tune_shape,
                       "chosen": chosen, "rows": rows, "log": log}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
