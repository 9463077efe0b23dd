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
   (dt A = -1e4 at ~1/256 of the steps by rescaled inputs, as the models
   made them before the op took `starts`; tests/ops covers `starts` itself).
   Tolerances are the bf16 ones of tests/ops/test_ssd_triton.py. For scale,
   the table also shows the error of the reference itself run on the bf16
   inputs (float32 compute, bf16 outputs), i.e. what the model gets today.
2. Timing: forward and forward+backward, median of CUDA-event timings, for
   the reference (eager), the reference under torch.compile (skipped with
   --no-compile or if compiling fails) and Triton.

    source benchmarks/gpu_session.sh
    python3 benchmarks/ssd_kernel_check.py --json $OUT/ssd_kernel_check.json

3. The Triton kernels' own times (torch profiler) per shape.

Options: --shapes nam-125m,nam-1b,nam56r-m3  --iters 20  --no-compile  --skip-timing
         --float32-states  (the chunk states in float32, not bf16: triton_ssd.HALF_STATES off)
"""
from __future__ import annotations

import math
import sys

import torch
from kernel_check_util import (finish, parse_args, parity_result, print_kernel_times, print_parity,
                               print_timing, profile_kernels)
from kernel_check_util import run_grads as _run_grads
from kernel_check_util import timing_rows

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


def run_grads(fn, inputs, chunk, gy, gs, cast=None):
    return _run_grads(lambda ins: fn(*ins[:5], chunk, D=ins[5], initial_state=ins[6]), "y", NAMES,
                      inputs, gy, gs, cast)


def parity(name, shape, variant, seed):
    from megacpp.ops.ssd.reference import ssd as ssd_ref
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    kw = dict(with_d=True, with_init=True, resets=1 / 256) if variant == "D+init+resets" else {}
    inputs = make_inputs(shape, seed=seed, **kw)
    b, l, h, p, g, n, chunk = shape
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    gy = torch.randn(b, l, h, p, device=DEV, generator=gen)
    gs = torch.randn(b, h, p, n, device=DEV, generator=gen)
    run = lambda fn, ins, gy, gs, cast=None: run_grads(fn, ins, chunk, gy, gs, cast)  # noqa: E731
    return parity_result(name, variant, DEV, TOL_BF16, run, ssd_triton, ssd_ref, inputs, gy, gs)


def timing(name, shape, iters, compile_ref):
    from megacpp.ops.ssd.reference import ssd as ssd_ref
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    chunk = shape[-1]
    inputs = make_inputs(shape, seed=0)
    gy = torch.randn_like(inputs[0])
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]

    def fwd(fn):
        with torch.no_grad():
            fn(*inputs[:5], chunk)

    def fwd_bwd(fn):
        y, _ = fn(*leaves, chunk)
        y.backward(gy)
        for t in leaves:
            t.grad = None

    return timing_rows(name, ssd_ref, ssd_triton, compile_ref, iters, fwd, fwd_bwd)


def kernel_times(name, shape, iters):
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    chunk = shape[-1]
    inputs = make_inputs(shape, seed=0)
    leaves = [t.detach().clone().requires_grad_() for t in inputs[:5]]
    gy = torch.randn_like(inputs[0])

    def step():
        y, _ = ssd_triton(*leaves, chunk)
        y.backward(gy)

    return profile_kernels(name, step, iters)


def main(argv=None):
    def states_arg(ap):
        ap.add_argument("--float32-states", action="store_true",
                        help="store the chunk states in float32 (triton_ssd.HALF_STATES = False)")

    args = parse_args(__doc__.split("\n")[0], SHAPES, argv, extra=states_arg)

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
    from megacpp.ops.ssd import triton_ssd
    if args.float32_states:
        triton_ssd.HALF_STATES = False
    dev = torch.device(DEV)
    info = {"device": torch.cuda.get_device_name(dev) if DEV == "cuda" else "cpu (interpreter smoke)", "torch": torch.__version__, "triton": triton.__version__,
            "ssd_backend": ssd_backend(dev, torch.bfloat16), "why_not": ssd_backend_reason(dev, torch.bfloat16),
            "chunk_states": str(triton_ssd.states_dtype(torch.empty(0, dtype=torch.bfloat16))).replace("torch.", "")}
    print(f"# {info}")
    shapes = [s for s in args.shapes.split(",") if s]

    results = {"info": info, "parity": [], "timing": []}
    print("\n## parity (bf16 inputs; error vs float64 reference: norm = |a-r|/|r|, max = max|a-r|/max|r|)")
    cases = [(s, "model") for s in shapes] + ([("nam-125m", "D+init+resets")] if "nam-125m" in shapes else [])
    all_ok = print_parity(results, cases, parity, SHAPES, args.seed, 14)
    if not args.skip_timing:
        print_timing(results, shapes, timing, SHAPES, args)
        print_kernel_times(results, shapes, kernel_times, SHAPES, args)
    return finish(results, all_ok, args.json, "SSD")


if __name__ == "__main__":
    sys.exit(main())
