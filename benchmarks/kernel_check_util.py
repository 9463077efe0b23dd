"""The parity / timing harness shared by benchmarks/ssd_kernel_check.py and
benchmarks/delta_rule_kernel_check.py: a Triton op against its pure-torch
reference at the model shapes (errors vs the float64 reference, with the
float32 reference's own error for scale), CUDA-event timings, the command
line and the printed tables. Each script supplies its op, inputs and shapes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def err(a, r):
    """(||a - r|| / ||r||, max|a - r| / max|r|) in float64."""
    a, r = a.detach().double(), r.detach().double()
    d = a - r
    return (d.norm() / r.norm().clamp_min(1e-300)).item(), (d.abs().max() / r.abs().max().clamp_min(1e-300)).item()


def run_grads(call, out_name, names, inputs, go, gs, cast=None):
    """Forward + backward of call(leaves) -> (out, state) against the cotangents
    go / gs; returns {out_name, "final_state", "d<input>": ...}. `cast`: the
    dtype the leaves are made in (else clones of the inputs)."""
    ins = [None if t is None else (t.detach().to(cast) if cast else t.detach().clone()).requires_grad_()
           for t in inputs]
    o, s = call(ins)
    ((o.to(go.dtype) * go).sum() + (s.to(gs.dtype) * gs).sum()).backward()
    out = {out_name: o.detach(), "final_state": s.detach()}
    for name, t in zip(names, ins):
        if t is not None:
            out["d" + name] = t.grad
    return out


def parity_result(name, variant, dev, tol, run, ours_fn, ref_fn, inputs, go, gs):
    """One parity case: ours_fn vs ref_fn (float64 and float32) through
    run(fn, inputs, go, gs, cast=None); rows of per-tensor errors, ok if every
    tensor is finite and within tol = (norm, max)."""
    t0 = time.perf_counter()
    ours = run(ours_fn, inputs, go, gs)
    if dev == "cuda":
        torch.cuda.synchronize()
    t_ours = time.perf_counter() - t0
    # The bf16 outputs' backward rounds the incoming gradients to bf16 whoever
    # computes the op; give the float64 reference the same rounded values so
    # the error measured is the computation's, not that rounding's.
    ref = run(ref_fn, inputs, go.to(inputs[0].dtype).double(), gs.to(inputs[0].dtype).double(),
              cast=torch.float64)
    ref32 = run(ref_fn, inputs, go, gs)  # what the model runs today
    rows, ok = [], True
    for k in ref:
        e, e_ref = err(ours[k], ref[k]), err(ref32[k], ref[k])
        finite = bool(torch.isfinite(ours[k]).all())
        good = finite and e[0] <= tol[0] and e[1] <= tol[1]
        ok &= good
        rows.append({"tensor": k, "norm": e[0], "max": e[1], "ref_fp32_norm": e_ref[0], "ref_fp32_max": e_ref[1],
                     "finite": finite, "ok": good})
    del ours, ref, ref32
    if dev == "cuda":
        torch.cuda.empty_cache()
    return {"shape": name, "variant": variant, "ok": ok, "first_call_s": t_ours, "rows": rows}


def expert_batch(gen, rows: int, experts: int, d_in: int, d_out: int, align: int = 1):
    """A grouped GEMM's operands as an MoE layer hands them over, bf16 on CUDA:
    (group ends offs (E,) int32 of `rows` rows in groups of near-uniform random
    size, x (rows, d_in), w (E, d_in, d_out), a cotangent g (rows, d_out)).
    align > 1 rounds every group but the last down to a multiple of it (a
    grouped GEMM whose token dimension is contiguous needs 16-byte group starts)."""
    share = torch.rand(experts, device="cuda", generator=gen) * 0.4 + 0.8
    counts = (share / share.sum() * rows / align).floor().to(torch.int32) * align
    counts[-1] += rows - counts.sum()
    offs = torch.cumsum(counts, 0).to(torch.int32)
    x = torch.randn(rows, d_in, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(experts, d_in, d_out, device="cuda", generator=gen) * d_in ** -0.5).bfloat16()
    g = torch.randn(rows, d_out, device="cuda", generator=gen).bfloat16()
    return offs, x, w, g


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


def timing_rows(name, ref_fn, triton_fn, compile_ref, iters, fwd, fwd_bwd):
    """Timings of the reference (eager, and compiled if compile_ref) and Triton:
    fwd(fn) and fwd_bwd(fn) run one forward / forward+backward of fn."""
    impls = [("reference", ref_fn)]
    if compile_ref:
        torch._dynamo.reset()
        impls.append(("reference+compile", torch.compile(ref_fn, dynamic=False)))
    impls.append(("triton", triton_fn))
    out = []
    for label, fn in impls:
        try:
            t0 = time.perf_counter()
            fwd_bwd(fn)  # compiles / autotunes outside the timed region
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            f_ms = cuda_time(lambda: fwd(fn), iters)
            fb_ms = cuda_time(lambda: fwd_bwd(fn), iters)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            out.append({"shape": name, "impl": label, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                        "peak_extra_mib": peak, "first_call_s": first})
        except Exception as e:  # e.g. compile failure: report, keep going
            out.append({"shape": name, "impl": label, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        torch.cuda.empty_cache()
    return out


def parse_args(description, shapes, argv=None, extra=None):
    """The scripts' shared options; extra(ap) adds a script's own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--shapes", default=",".join(shapes))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference timing")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    if extra is not None:
        extra(ap)
    return ap.parse_args(argv)


def print_parity(results, cases, parity, shapes, seed, vw):
    """Run parity(name, shape, variant, seed) for every case, print the table
    (variant column vw wide), collect into results; True if all passed."""
    all_ok = True
    print(f"{'shape':10s} {'variant':{vw}s} {'tensor':14s} {'triton norm':>11s} {'max':>9s}   "
          f"{'ref-f32 norm':>12s} {'max':>9s}  ok")
    for name, variant in cases:
        r = parity(name, shapes[name], variant, seed)
        results["parity"].append(r)
        all_ok &= r["ok"]
        for row in r["rows"]:
            print(f"{name:10s} {variant:{vw}s} {row['tensor']:14s} {row['norm']:11.2e} {row['max']:9.2e}   "
                  f"{row['ref_fp32_norm']:12.2e} {row['ref_fp32_max']:9.2e}  {'ok' if row['ok'] else 'FAIL'}")
        sys.stdout.flush()
    return all_ok


def print_timing(results, names, timing, shapes, args):
    """Run timing(name, shape, iters, compile_ref) for every shape and print the table."""
    print("\n## timing (bf16, median of CUDA events; ms)")
    print(f"{'shape':10s} {'impl':18s} {'fwd':>9s} {'fwd+bwd':>9s} {'peak MiB':>9s} {'1st call s':>10s}")
    for name in names:
        rows = timing(name, shapes[name], args.iters, not args.no_compile)
        results["timing"].extend(rows)
        for r in rows:
            if "error" in r:
                print(f"{name:10s} {r['impl']:18s} {r['error']}")
            else:
                print(f"{name:10s} {r['impl']:18s} {r['fwd_ms']:9.3f} {r['fwd_bwd_ms']:9.3f} "
                      f"{r['peak_extra_mib']:9.0f} {r['first_call_s']:10.1f}")
        sys.stdout.flush()


def finish(results, all_ok, json_path, what):
    """Write the JSON, report; the exit status (1 if any parity case failed)."""
    results["ok"] = all_ok
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {json_path}")
    if not all_ok:
        bad = [(r["shape"], r["variant"], [x["tensor"] for x in r["rows"] if not x["ok"]])
               for r in results["parity"] if not r["ok"]]
        print(f"\n{what} PARITY FAILED: {bad}", file=sys.stderr)
        return 1
    print("\nparity ok")
    return 0


def profile_kernels(name, step, iters, top=12):
    """The largest kernels of step() (torch profiler, CUDA time, ms per call of step)."""
    from torch.profiler import ProfilerActivity, profile
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
    return rows[:top]


def print_kernel_times(results, shapes, kernel_times, shape_table, args):
    """kernel_times(name, shape, iters) per shape into results["kernels"], printed; a failing
    profiler is reported, never fatal."""
    print("\n## Triton kernels, forward+backward (profiler CUDA time, ms per step)")
    results.setdefault("kernels", [])
    for name in shapes:
        try:
            rows = kernel_times(name, shape_table[name], max(3, args.iters // 4))
        except Exception as e:  # the profiler is a nicety: never fail the check on it
            print(f"{name:10s} profiler failed: {type(e).__name__}: {e}")
            continue
        results["kernels"].extend(rows)
        for r in rows:
            print(f"{name:10s} {r['kernel']:60s} {r['ms_per_step']:8.3f}")
        sys.stdout.flush()
