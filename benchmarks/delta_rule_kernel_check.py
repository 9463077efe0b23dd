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
         --solve blocks|rows  (how _wy_fwd_kernel solves T; the module's SOLVE)
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from kernel_check_util import (finish, parse_args, parity_result, print_kernel_times, print_parity,
                               print_timing, profile_kernels)
from kernel_check_util import run_grads as _run_grads
from kernel_check_util import timing_rows

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


def run_grads(fn, inputs, chunk, go, gs, cast=None):
    return _run_grads(lambda ins: fn(*ins[:5], ins[5], chunk_size=chunk), "o", NAMES, inputs, go, gs, cast)


def parity(name, shape, variant, seed):
    """variant: "model" or "init+resets", with "/fla" for flash-linear-attention's kernels."""
    from megacpp.ops.delta_rule.fla_adapter import gated_delta_rule_fla
    from megacpp.ops.delta_rule.reference import gated_delta_rule as gdr_ref
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    impl = gated_delta_rule_fla if variant.endswith("/fla") else gated_delta_rule_triton
    kw = dict(with_init=True, resets=1 / 256) if variant.startswith("init+resets") else {}
    inputs = make_inputs(shape, seed=seed, **kw)
    b, l, h, dk, dv, chunk = shape
    gen = torch.Generator(device=DEV).manual_seed(seed + 1)
    go = torch.randn(b, l, h, dv, device=DEV, generator=gen)
    gs = torch.randn(b, h, dk, dv, device=DEV, generator=gen)
    run = lambda fn, ins, go, gs, cast=None: run_grads(fn, ins, chunk, go, gs, cast)  # noqa: E731
    return parity_result(name, variant, DEV, TOL_BF16, run, impl, gdr_ref, inputs, go, gs)


def timing(name, shape, iters, compile_ref):
    from megacpp.ops.delta_rule.reference import gated_delta_rule as gdr_ref
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    chunk = shape[-1]
    inputs = make_inputs(shape, seed=0)[:5]
    go = torch.randn_like(inputs[2])
    leaves = [t.detach().clone().requires_grad_() for t in inputs]

    def fwd(fn):
        with torch.no_grad():
            fn(*inputs, chunk_size=chunk)

    def fwd_bwd(fn):
        o, _ = fn(*leaves, chunk_size=chunk)
        o.backward(go)
        for t in leaves:
            t.grad = None

    return timing_rows(name, gdr_ref, gated_delta_rule_triton, compile_ref, iters, fwd, fwd_bwd)


def kernel_times(name, shape, iters):
    """Per-kernel share of Triton forward+backward (torch profiler, CUDA time)."""
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    chunk = shape[-1]
    leaves = [t.detach().clone().requires_grad_() for t in make_inputs(shape, seed=0)[:5]]
    go = torch.randn_like(leaves[2])

    def step():
        o, _ = gated_delta_rule_triton(*leaves, chunk_size=chunk)
        o.backward(go)

    return profile_kernels(name, step, iters)


def main(argv=None):
    def solve_arg(ap):
        ap.add_argument("--solve", choices=["blocks", "rows"], default=None,
                        help="_wy_fwd_kernel's solve of T (default: the module's SOLVE)")

    args = parse_args(__doc__.split("\n")[0], SHAPES, argv, extra=solve_arg)

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
    from megacpp.ops.delta_rule import triton_delta_rule as tdr
    from megacpp.ops.delta_rule.dispatch import fla_reason
    if args.solve:
        tdr.SOLVE = args.solve
    from megacpp.ops.delta_rule.fla_adapter import FLA_CHUNK
    dev = torch.device(DEV)
    info = {"device": torch.cuda.get_device_name(dev) if DEV == "cuda" else "cpu (interpreter smoke)",
            "torch": torch.__version__, "triton": triton.__version__,
            "delta_rule_backend": delta_rule_backend(dev, torch.bfloat16),
            "why_not": delta_rule_backend_reason(dev, torch.bfloat16),
            "fla": fla_reason(dev) or "runs", "wy_solve": tdr.SOLVE}
    print(f"# {info}")
    shapes = [s for s in args.shapes.split(",") if s]

    results = {"info": info, "parity": [], "timing": [], "kernels": []}
    print("\n## parity (bf16 q/k/v, float32 g/beta; error vs float64 reference: norm = |a-r|/|r|, "
          "max = max|a-r|/max|r|)")
    cases = [(s, "model") for s in shapes] + ([("nam-125m", "init+resets")] if "nam-125m" in shapes else [])
    if info["fla"] != "runs":
        print(f"# flash-linear-attention's kernels not checked: {info['fla']}")
    else:  # where the dispatcher would take fla's kernels, check them too
        cases += [(s, v + "/fla") for s, v in list(cases) if SHAPES[s][-1] == FLA_CHUNK]
    all_ok = print_parity(results, cases, parity, SHAPES, args.seed, 12)
    if not args.skip_timing:
        print_timing(results, shapes, timing, SHAPES, args)
        print_kernel_times(results, shapes, kernel_times, SHAPES, args)
    return finish(results, all_ok, args.json, "GATED DELTA RULE")


if __name__ == "__main__":
    sys.exit(main())
