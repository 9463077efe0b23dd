"""The Triton gated RMSNorm against the compiled reference it replaces (issue 8).

At each model's output-norm shape, forward + backward (dx, dz, d(weight)) of
  - the reference under torch.compile (what inductor made of GatedRMSNorm
    before the kernels: its forward, per-row backward and column reduction),
  - the Triton op (ops/gated_norm/triton_gated_norm.py),
timed with CUDA events (median of --reps after warm-up), with the minimal
bytes each must move and the bandwidth that implies, and every output
checked against the float64 reference. z is a column slice of a wider
tensor, as the in_proj output hands it over. A table is printed last.

--sweep also times the Triton op at each (TILE, num_warps) of SWEEP for both
kernels (triton_gated_norm.LAUNCH), parity checked, and names the fastest
per shape against the defaults.

    python benchmarks/gated_norm_bench.py [--json OUT] [--reps 50] [--sweep]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
from kernel_check_util import cuda_time

from megacpp.ops.gated_norm import gated_rms_norm

SWEEP = [(tile, warps) for tile in (1024, 2048, 4096, 8192) for warps in (4, 8, 16)]
# name: (x's shape, group, norm_before_gate, width of the projection z is cut from):
# z is the first channels of a (batch, seqlen, width) tensor, as the model hands it
# over (Mamba-2's in_proj output; Gated DeltaNet's fused projections, reshaped to heads)
SHAPES = {
    "mamba2-130m M (8x2048, 1536)": ((8, 2048, 1536), 1536, False, 3352),
    "nam-125m M (16x2048, 1536)": ((16, 2048, 1536), 1536, False, 3352),
    "nam-125m R (16x2048x6 heads, 128)": ((16, 2048, 6, 128), 128, True, 3084),
    "nam-1b M (16x2048, 4096)": ((16, 2048, 4096), 4096, False, 8512),
}


DEV = "cuda"


def inputs(shape, width, gen):
    half = torch.bfloat16 if DEV == "cuda" else torch.float16  # the interpreter cannot multiply bf16
    x = torch.randn(shape, generator=gen, device=DEV).to(half)
    inner = x[0, 0].numel()
    wide = torch.randn(*shape[:2], width, generator=gen, device=DEV).to(half)
    z = wide[..., :inner].reshape(shape)
    w = 1 + 0.3 * torch.randn(shape[-1], generator=gen, device=DEV)
    dy = torch.randn(shape, generator=gen, device=DEV).to(half)
    return x, z, w, dy


def host_time(fn, reps):
    """The CPU smoke's stand-in for cuda_time (interpreted kernels: no meaning as a speed)."""
    import time
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def step(fn, x, z, w, dy, group, nbg):
    leaves = [t.detach().requires_grad_(True) for t in (x, z, w)]
    y = fn(*leaves, 1e-5, group, nbg)
    y.backward(dy)
    return [y] + [t.grad for t in leaves]


def rel(a, r):
    a, r = a.detach().double(), r.detach().double()
    return ((a - r).norm() / r.norm().clamp_min(1e-300)).item()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument("--sweep", action="store_true", help="time the Triton op at every launch of SWEEP too")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEV, cuda_time
    if args.cpu_smoke:  # this script's code paths on CPU under TRITON_INTERPRET=1, tiny shapes
        DEV, cuda_time = "cpu", host_time
        SHAPES.clear()
        SHAPES.update({"tiny M": ((2, 10, 48), 48, False, 100), "tiny R": ((2, 6, 2, 16), 16, True, 70)})
        SWEEP[:] = [(64, 4), (1024, 4)]
        args.reps = 1
    elif not torch.cuda.is_available():
        print("gated_norm_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    from megacpp.ops.gated_norm import triton_gated_norm as T
    from megacpp.ops.gated_norm.triton_gated_norm import gated_rms_norm_triton
    compiled = torch.compile(gated_rms_norm, dynamic=False) if DEV == "cuda" else gated_rms_norm
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows, bad = [], []
    for name, (shape, group, nbg, zstride) in SHAPES.items():
        x, z, w, dy = inputs(shape, zstride, gen)
        ref = step(gated_rms_norm, x.double(), z.double(), w.double(), dy.double(), group, nbg)
        errs = {}
        for label, fn in (("compiled reference", compiled), ("triton", gated_rms_norm_triton)):
            out = step(fn, x, z, w, dy, group, nbg)
            errs[label] = max(rel(o, r) for o, r in zip(out, ref))
            t = cuda_time(lambda: step(fn, x, z, w, dy, group, nbg), args.reps)
            # forward reads x, z and writes y; backward reads x, z, dy and writes dx, dz
            gbytes = 8 * x.numel() * x.element_size() / 1e9
            rows.append({"shape": name, "path": label, "fwd_bwd_ms": t, "max_rel_err": errs[label],
                         "GB/s (8 tensor passes)": gbytes / (t / 1e3)})
        if errs["triton"] > 2e-2:
            bad.append(name)
        if args.sweep:
            for tile, warps in SWEEP:
                T.LAUNCH.update(fwd={"TILE": tile, "num_warps": warps}, bwd={"TILE": tile, "num_warps": warps})
                try:
                    out = step(gated_rms_norm_triton, x, z, w, dy, group, nbg)
                    e = max(rel(o, r) for o, r in zip(out, ref))
                    t = cuda_time(lambda: step(gated_rms_norm_triton, x, z, w, dy, group, nbg), args.reps)
                except Exception as ex:  # a launch that does not compile here: report, go on
                    print(f"{name}: TILE {tile} warps {warps}: {type(ex).__name__}: {ex}", file=sys.stderr)
                    continue
                finally:
                    T.LAUNCH.update(fwd={}, bwd={})
                rows.append({"shape": name, "path": f"triton TILE {tile} w{warps}", "fwd_bwd_ms": t,
                             "max_rel_err": e, "GB/s (8 tensor passes)": gbytes / (t / 1e3)})
                if e > 2e-2:
                    bad.append(f"{name} TILE {tile} w{warps}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (interpreter smoke)",
                       "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"{'shape':38s} {'path':20s} {'fwd+bwd ms':>10s} {'GB/s':>8s} {'rel err':>9s}")
    for r in rows:
        print(f"{r['shape']:38s} {r['path']:20s} {r['fwd_bwd_ms']:10.3f} {r['GB/s (8 tensor passes)']:8.0f} "
              f"{r['max_rel_err']:9.1e}")
    if args.sweep:
        print("\nfastest launch per shape (sweep) against the defaults:")
        for name in SHAPES:
            mine = [r for r in rows if r["shape"] == name and r["path"].startswith("triton")]
            if mine:
                best = min(mine, key=lambda r: r["fwd_bwd_ms"])
                base = next(r for r in mine if r["path"] == "triton")
                print(f"  {name:38s} {best['path']:22s} {best['fwd_bwd_ms']:.3f} ms (defaults {base['fwd_bwd_ms']:.3f})")
    if bad:
        print(f"FAILED parity (rel err > 2e-2): {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
