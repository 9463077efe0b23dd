"""Triton gated delta rule on the GPU: parity at the real model shapes, then timings.

1. Parity (exit status 1 on any mismatch): forward o / final_state and the
   gradients of every input, Triton vs the reference evaluated in float64
   on the same input values, at the R-layer shapes the recipes train with
   (dk = dv = 128, chunk 64):
       nam-125m   b=16, l=2048,  6 heads
       nam-1b     b=8,  l=2048, 16 heads
       nam56r     b=4,  l=4096, 28 heads
   as model.recurrent calls it (bf16 q/k/v from the autocast projections,
   L2-normalised q and k, float32 g and beta, no initial state), plus one
   nam-125m variant with an initial state and document resets (g = -1e4 at
   ~1/256 of the steps, the way model.context.reset_log_decay makes them).
   Tolerances are the bf16 ones of tests/ops/test_delta_rule_triton.py. For
   scale, the table also shows the error of the reference itself run on the
   bf16 inputs (float32 compute, bf16 outputs), i.e. what the model gets today.
2. Timing: forward and forward+backward, median of CUDA-event timings, for
   the reference (eager), the reference under torch.compile (skipped with
   --no-compile or if compiling fails) and Triton.

    source benchmarks/gpu_session.sh
    python3 benchmarks/delta_rule_kernel_check.py --json $OUT/delta_rule_kernel_check.json

Options: --shapes nam-125m,nam-1b,nam56r  --iters 20  --no-compile  --skip-timing
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {  # name: (b, l, h, dk, dv, chunk)
    "nam-125m": (16, 2048, 6, 128, 128, 64),
    "nam-1b": (8, 2048, 16, 128, 128, 64),
    "nam56r": (4, 4096, 28, 128, 128, 64),
}
DEV = "cuda"  # --cpu-smoke: "cpu" (TRITON_INTERPRET=1, tiny shape; checks this script, not the GPU)
TOL_BF16 = (2e-2, 5e-2)  # (norm, max); see tests/ops/test_delta_rule_triton.py
NAMES = ("q", "k", "v", "g", "beta", "initial_state")
RESET = -1.0e4  # model.context.RESET_LOG_DECAY


def make_inputs(shape, *, seed, with_init=False, resets=0.0, dtype=torch.bfloat16):
    b, l, h, dk, dv, _ = shape
    gen = torch.Generator(device=DEV).manual_seed(seed)
    kw = dict(device=DEV, generator=gen)
    q = F.normalize(torch.randn(b, l, h, dk, **kw), dim=-1)
    k = F.normalize(torch.randn(b, l, h, dk, **kw), dim=-1)
    v = F.silu(torch.randn(b, l, h, dv, **kw))
    A = torch.empty(h, device=DEV).uniform_(1.0, 16.0, generator=gen)
    dt = torch.exp(torch.empty(b, l, h, device=DEV).uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    g = -A * dt
    beta = torch.sigmoid(torch.randn(b, l, h, **kw))
    s0 = torch.randn(b, h, dk, dv, **kw) if with_init else None
    if resets:
        starts = torch.rand(b, l, h, **kw) < resets
        g = torch.where(starts, torch.full_like(g, RESET), g)
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return [c(q), c(k), c(v), g, beta, c(s0)]


def _err(a, r):
    a, r = a.detach().double(), r.detach().double()
    d = a - r
    return (d.norm() / r.norm().clamp_min(1e-300)).item(), (d.abs().max() / r.abs().max().clamp_min(1e-300)).item()


def run_grads(fn, inputs, chunk, go, gs, cast=None):
    ins = [None if t is None else (t.detach().to(cast) if cast else t.detach().clone()).requires_grad_()
           for t in inputs]
    o, s = fn(*ins[:5], ins[5], chunk_size=chunk)
    ((o.to(go.dtype) * go).sum() + (s.to(gs.dtype) * gs).sum()).backward()
    out = {"o": o.detach(), "final_state": s.detach()}
    for name, t in zip(NAMES, ins):
        if t is not None:
            out["d" + name] = t.grad
    return out


def parity(name, shape, variant, seed):
    from megacpp.ops.delta_rule.reference import gated_delta_rule as gdr_ref
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    kw = dict(with_init=True, resets=1 / 256) if variant == "init+resets" else {}
    inputs = make_inputs(shape, seed=seed, **kw)
    b, l, h, dk, dv, chunk = shape
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    go = torch.randn(b, l, h, dv, device=DEV, generator=gen)
    gs = torch.randn(b, h, dk, dv, device=DEV, generator=gen)
    t0 = time.perf_counter()
    ours = run_grads(gated_delta_rule_triton, inputs, chunk, go, gs)
    if DEV == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    # The bf16 outputs' backward rounds the incoming gradients to bf16 whoever
    # computes the op; give the float64 reference the same rounded values so
    # the error measured is the computation's, not that rounding's.
    ref = run_grads(gdr_ref, inputs, chunk, go.to(inputs[0].dtype).double(), gs.to(inputs[0].dtype).double(),
                    cast=torch.float64)
    ref32 = run_grads(gdr_ref, inputs, chunk, go, gs)  # what the model runs today
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
    from megacpp.ops.delta_rule.reference import gated_delta_rule as gdr_ref
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    chunk = shape[-1]
    inputs = make_inputs(shape, seed=0)[:5]
    go = torch.randn_like(inputs[2])
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    impls = [("reference", gdr_ref)]
    if compile_ref:
        torch._dynamo.reset()
        impls.append(("reference+compile", torch.compile(gdr_ref, dynamic=False)))
    impls.append(("triton", gated_delta_rule_triton))
    out = []
    for label, fn in impls:
        def fwd():
            with torch.no_grad():
                fn(*inputs, chunk_size=chunk)

        def fwd_bwd():
            o, _ = fn(*leaves, chunk_size=chunk)
            o.backward(go)
            for t in leaves:
                t.grad = None

        try:
            t0 = time.perf_counter()
            fwd_bwd()  # compiles outside the timed region
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


def kernel_times(name, shape, iters):
    """Per-kernel share of Triton forward+backward (torch profiler, CUDA time)."""
    from torch.profiler import ProfilerActivity, profile

    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    chunk = shape[-1]
    leaves = [t.detach().clone().requires_grad_() for t in make_inputs(shape, seed=0)[:5]]
    go = torch.randn_like(leaves[2])

    def step():
        o, _ = gated_delta_rule_triton(*leaves, chunk_size=chunk)
        o.backward(go)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t:
            rows.append({"shape": name, "kernel": ev.key[:60], "ms_per_step": t / 1e3 / iters})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return rows[:12]


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
        SHAPES["nam-125m"] = (1, 40, 2, 16, 16, 16)
        args.shapes, args.skip_timing = "nam-125m", True
    elif not torch.cuda.is_available():
        print("delta_rule_kernel_check: needs CUDA", file=sys.stderr)
        return 2
    import triton

    from megacpp.ops.delta_rule import delta_rule_backend, delta_rule_backend_reason
    dev = torch.device(DEV)
    info = {"device": torch.cuda.get_device_name(dev) if DEV == "cuda" else "cpu (interpreter smoke)",
            "torch": torch.__version__, "triton": triton.__version__,
            "delta_rule_backend": delta_rule_backend(dev, torch.bfloat16),
            "why_not": delta_rule_backend_reason(dev, torch.bfloat16)}
    print(f"# {info}")
    shapes = [s for s in args.shapes.split(",") if s]

    results = {"info": info, "parity": [], "timing": [], "kernels": []}
    all_ok = True
    print("\n## parity (bf16 q/k/v, float32 g/beta; error vs float64 reference: norm = |a-r|/|r|, "
          "max = max|a-r|/max|r|)")
    print(f"{'shape':10s} {'variant':12s} {'tensor':14s} {'triton norm':>11s} {'max':>9s}   "
          f"{'ref-f32 norm':>12s} {'max':>9s}  ok")
    cases = [(s, "model") for s in shapes] + ([("nam-125m", "init+resets")] if "nam-125m" in shapes else [])
    for name, variant in cases:
        r = parity(name, SHAPES[name], variant, args.seed)
        results["parity"].append(r)
        all_ok &= r["ok"]
        for row in r["rows"]:
            print(f"{name:10s} {variant:12s} {row['tensor']:14s} {row['norm']:11.2e} {row['max']:9.2e}   "
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
        print("\n## Triton kernels, forward+backward (profiler CUDA time, ms per step)")
        for name in shapes:
            try:
                rows = kernel_times(name, SHAPES[name], max(3, args.iters // 4))
            except Exception as e:  # the profiler is a nicety: never fail the check on it
                print(f"{name:10s} profiler failed: {type(e).__name__}: {e}")
                continue
            results["kernels"].extend(rows)
            for r in rows:
                print(f"{name:10s} {r['kernel']:60s} {r['ms_per_step']:8.3f}")
            sys.stdout.flush()

    results["ok"] = all_ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.json}")
    if not all_ok:
        bad = [(r["shape"], r["variant"], [x["tensor"] for x in r["rows"] if not x["ok"]])
               for r in results["parity"] if not r["ok"]]
        print(f"\nGATED DELTA RULE PARITY FAILED: {bad}", file=sys.stderr)
        return 1
    print("\nparity ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
