"""Triton SSD on the GPU: parity at the real model shapes, then timings.

1. Parity (exit status 1 on any mismatch): forward y / final_state and the
   gradients of every input, Triton vs the reference evaluated in float64
   on the same input values, at the Mamba shapes the recipes train with
   (l=2048, chunk 128, headdim 64):
       nam-125m   b=16, 24 heads,  1 group,  dstate 128   (Mamba-2)
       nam-1b     b=8,  64 heads,  1 group,  dstate 128   (Mamba-2)
       nam56r-m3  b=2, 224 heads, 224 groups, dstate 64  (Mamba-3: 2H heads, per-head B/C)
   as Mamba calls it (bf16 x/B/C, float32 dt/A, no D, no initial state),
   plus one nam-125m variant with D, an initial state and document resets
   (dt A = -1e4 at ~1/256 of the steps, the way ssd_with_resets makes them).
   Tolerances are the bf16 ones of tests/ops/test_ssd_triton.py. For scale,
   the table also shows the error of the reference itself run on the bf16
   inputs (float32 compute, bf16 outputs), i.e. what the model gets today.
2. Timing: forward and forward+backward, median of CUDA-event timings, for
   the reference (eager), the reference under torch.compile (skipped with
   --no-compile or if compiling fails) and Triton.

    source benchmarks/gpu_session.sh
    python3 benchmarks/ssd_kernel_check.py --json $OUT/ssd_kernel_check.json

Options: --shapes nam-125m,nam-1b,nam56r-m3  --iters 20  --no-compile  --skip-timing
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch

SHAPES = {  # name: (b, l, h, p, g, n, chunk)
    "nam-125m": (16, 2048, 24, 64, 1, 128, 128),
    "nam-1b": (8, 2048, 64, 64, 1, 128, 128),
    "nam56r-m3": (2, 2048, 224, 64, 224, 64, 128),
}
DEV = "cuda"  # --cpu-smoke: "cpu" (TRITON_INTERPRET=1, tiny shape; checks this script, not the GPU)
TOL_BF16 = (2e-2, 5e-2)  # (norm, max); see tests/ops/test_ssd_triton.py
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def make_inputs(shape, *, seed, with_d=False, with_init=False, resets=0.0, dtype=torch.bfloat16):
    b, l, h, p, g, n, _ = shape
    gen = torch.Generator(device=DEV).manual_seed(seed)
    kw = dict(device=DEV, generator=gen)
    x = torch.randn(b, l, h, p, **kw)
    dt = torch.exp(torch.empty(b, l, h, device=DEV).uniform_(math.log(1e-3), math.log(0.5), generator=gen))
    A = -torch.empty(h, device=DEV).uniform_(0.5, 16.0, generator=gen)
    B = torch.randn(b, l, g, n, **kw)
    C = torch.randn(b, l, g, n, **kw)
    D = torch.randn(h, **kw) if with_d else None
    s0 = torch.randn(b, h, p, n, **kw) if with_init else None
    if resets:
        starts = torch.rand(b, l, **kw) < resets
        dt_new = torch.where(starts[..., None], (-1e4 / A).expand_as(dt), dt)
        x = x * (dt / dt_new)[..., None]
        dt = dt_new
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [c(x), dt, A, c(B), c(C), D, c(s0)]


def _err(a, r):
    a, r = a.detach().double(), r.detach().double()
    d = a - r
    return (d.norm() / r.norm().clamp_min(1e-300)).item(), (d.abs().max() / r.abs().max().clamp_min(1e-300)).item()


def run_grads(fn, inputs, chunk, gy, gs, cast=None):
    ins = [None if t is None else (t.detach().to(cast) if cast else t.detach().clone()).requires_grad_()
           for t in inputs]
    y, s = fn(*ins[:5], chunk, D=ins[5], initial_state=ins[6])
    ((y.to(gy.dtype) * gy).sum() + (s.to(gs.dtype) * gs).sum()).backward()
    out = {"y": y.detach(), "final_state": s.detach()}
    for name, t in zip(NAMES, ins):
        if t is not None:
            out["d" + name] = t.grad
    return out


def parity(name, shape, variant, seed):
    from megacpp.ops.ssd.reference import ssd as ssd_ref
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    kw = dict(with_d=True, with_init=True, resets=1 / 256) if variant == "D+init+resets" else {}
    inputs = make_inputs(shape, seed=seed, **kw)
    b, l, h, p, g, n, chunk = shape
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    gy = torch.randn(b, l, h, p, device=DEV, generator=gen)
    gs = torch.randn(b, h, p, n, device=DEV, generator=gen)
    t0 = time.perf_counter()
    ours = run_grads(ssd_triton, inputs, chunk, gy, gs)
    if DEV == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    # The bf16 outputs' backward rounds the incoming gradients to bf16 whoever
    # computes the op; give the float64 reference the same rounded values so
    # the error measured is the computation's, not that rounding's.
    ref = run_grads(ssd_ref, inputs, chunk, gy.to(inputs[0].dtype).double(), gs.to(inputs[0].dtype).double(),
                    cast=torch.float64)
    ref32 = run_grads(ssd_ref, inputs, chunk, gy, gs)  # what the model runs today
    rows, ok = [], True
    for k in ref:
        e, e_ref = _err(ours[k], ref[k]), _err(ref32[k], ref[k])
        finite = bool(torch.isfinite(ours[k]).all())
        good = finite and e[0] <= TOL_BF16[0] and e[1] <= TOL_BF16[1]
        ok &= good
        rows.append({"tensor": k, "norm": e[0], "max": e[1], "ref_fp32_norm": e_ref[0], "ref_fp32_max": e_ref[1],
                     "finite": finite, "ok": good})
    del ours, ref, ref32
    if DEV == "cuda":
        torch.cuda.empty_cache()
    return {"shape": name, "variant": variant, "ok": ok, "first_call_s": t_ours, "rows": rows}


def cuda_time(fn, iters, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def timing(name, shape, iters, compile_ref):
    from megacpp.ops.ssd.reference import ssd as ssd_ref
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    chunk = shape[-1]
    inputs = make_inputs(shape, seed=0)
    gy = torch.randn_like(inputs[0])
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]

    impls = [("reference", ssd_ref)]
    if compile_ref:
        torch._dynamo.reset()
        impls.append(("reference+compile", torch.compile(ssd_ref, dynamic=False)))
    impls.append(("triton", ssd_triton))
    out = []
    for label, fn in impls:
        def fwd():
            with torch.no_grad():
                fn(*inputs[:5], chunk)

        def fwd_bwd():
            y, _ = fn(*leaves, chunk)
            y.backward(gy)
            for t in leaves:
                t.grad = None

        try:
            t0 = time.perf_counter()
            fwd_bwd()  # compiles / autotunes outside the timed region
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            f_ms = cuda_time(fwd, iters)
            fb_ms = cuda_time(fwd_bwd, iters)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            out.append({"shape": name, "impl": label, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                        "peak_extra_mib": peak, "first_call_s": first})
        except Exception as e:  # e.g. compile failure: report, keep going
            out.append({"shape": name, "impl": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference timing")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.cpu_smoke:  # run this script's parity path on CPU under the Triton interpreter
        global DEV
        DEV = "cpu"
        SHAPES.clear()
        SHAPES["nam-125m"] = (1, 40, 2, 16, 1, 16, 16)
        args.shapes, args.skip_timing = "nam-125m", True
    elif not torch.cuda.is_available():
        print("ssd_kernel_check: needs CUDA", file=sys.stderr)
        return 2
    import triton
    from megacpp.ops.ssd import ssd_backend, ssd_backend_reason
    dev = torch.device(DEV)
    info = {"device": torch.cuda.get_device_name(dev) if DEV == "cuda" else "cpu (interpreter smoke)", "torch": torch.__version__, "triton": triton.__version__,
            "ssd_backend": ssd_backend(dev, torch.bfloat16), "why_not": ssd_backend_reason(dev, torch.bfloat16)}
    print(f"# {info}")
    shapes = [s for s in args.shapes.split(",") if s]

    results = {"info": info, "parity": [], "timing": []}
    all_ok = True
    print("\n## parity (bf16 inputs; error vs float64 reference: norm = |a-r|/|r|, max = max|a-r|/max|r|)")
    print(f"{'shape':10s} {'variant':14s} {'tensor':14s} {'triton norm':>11s} {'max':>9s}   "
          f"{'ref-f32 norm':>12s} {'max':>9s}  ok")
    cases = [(s, "model") for s in shapes] + ([("nam-125m", "D+init+resets")] if "nam-125m" in shapes else [])
    for name, variant in cases:
        r = parity(name, SHAPES[name], variant, args.seed)
        results["parity"].append(r)
        all_ok &= r["ok"]
        for row in r["rows"]:
            print(f"{name:10s} {variant:14s} {row['tensor']:14s} {row['norm']:11.2e} {row['max']:9.2e}   "
                  f"{row['ref_fp32_norm']:12.2e} {row['ref_fp32_max']:9.2e}  {'ok' if row['ok'] else 'FAIL'}")
        sys.stdout.flush()

    if not args.skip_timing:
        print("\n## timing (bf16, median of CUDA events; ms)")
        print(f"{'shape':10s} {'impl':18s} {'fwd':>9s} {'fwd+bwd':>9s} {'peak MiB':>9s} {'1st call s':>10s}")
        for name in shapes:
            rows = timing(name, SHAPES[name], args.iters, not args.no_compile)
            results["timing"].extend(rows)
            for r in rows:
                if "error" in r:
                    print(f"{name:10s} {r['impl']:18s} {r['error']}")
                else:
                    print(f"{name:10s} {r['impl']:18s} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
                          f"{r['peak_extra_mib']:9.0f} {r['first_call_s']:10.1f}")
            sys.stdout.flush()

    results["ok"] = all_ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    if not all_ok:
        bad = [(r["shape"], r["variant"], [x["tensor"] for x in r["rows"] if not x["ok"]])
               for r in results["parity"] if not r["ok"]]
        print(f"\nSSD PARITY FAILED: {bad}", file=sys.stderr)
        return 1
    print("\nparity ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
