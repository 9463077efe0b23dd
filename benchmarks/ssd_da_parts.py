"""Where the Triton SSD's float32 dA loses accuracy on the GPU (a diagnostic,
not a timing): the backward's parts of d(a) — the intra-chunk pairs
(`da_intra`), the chunk-state terms (`s_last`), the entering-state terms
(`dcum_state`), the whole-chunk decay (`dcl`) — and what feeds them
(`dstates`, `dcb`, `dt`, `cum`, `ddt_dir`), captured through
`triton_ssd.PARTS` for one of the CUDA tests' cases and seeds.

On the GPU, save them:

    python3 benchmarks/ssd_da_parts.py --case resets-g2-D --seed 28 --out parts_gpu.pt

Then under the Triton interpreter (whose float32 dA is ~1e-6 off the float64
reference, BENCHMARKS.md), on the same inputs, compare part by part:

    TRITON_INTERPRET=1 python3 benchmarks/ssd_da_parts.py --device cpu --case resets-g2-D \\
        --seed 28 --against parts_gpu.pt

For each part: the relative difference between the two runs, and dA (each
run's parts put through a float64 copy of _dglue_kernel's sums) with that
one part taken from the other run — the part whose swap moves dA towards
the other run's is where the gap comes from.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "ops"))
from test_ssd_triton import CUDA_CASES, compare, make_inputs  # noqa: E402

PARTS = ("da_intra", "s_last", "dcum_state", "dcl")


def dA_from_parts(p: dict, b: int, h: int, q: int) -> torch.Tensor:
    """_dglue_kernel's d(a) and d(A) = sum d(a) dt, in float64 torch (h,)."""
    nc = p["da_intra"].shape[2]
    da = p["da_intra"].double().sum(3)                                 # (b, h, nc, q)
    sl = p["s_last"].double().view(b, h, nc, q)
    da = da + sl.cumsum(-1) - sl
    dcs = p["dcum_state"].double().view(b, h, nc, q)
    da = da + dcs.flip(-1).cumsum(-1).flip(-1)
    da = da + p["dcl"].double().view(b, h, nc, -1).sum(-1, keepdim=True)
    dt = p["dt"].double().view(b, h, nc, q)
    return (da * dt).sum((0, 2, 3))


def rel(a, r):
    a, r = a.double(), r.double()
    return ((a - r).norm() / r.norm().clamp_min(1e-300)).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="resets-g2-D")
    ap.add_argument("--seed", type=int, default=28)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None, help="save this run's parts, errors and dA here")
    ap.add_argument("--against", default=None, help="a saved run to compare this one with, part by part")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("needs CUDA (or --device cpu under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    from megacpp.ops.ssd import triton_ssd

    cases = {p.id: p.values[0] for p in CUDA_CASES}
    b, l, h, p, g, n, chunk, with_d, with_init, resets = cases[a.case]
    gen = torch.Generator().manual_seed(a.seed)
    torch.manual_seed(a.seed)
    ins = make_inputs(b, l, h, p, g, n, dtype=getattr(torch, a.dtype), device=a.device, with_d=with_d,
                      with_init=with_init, resets=resets, gen=gen)
    captured: dict = {}
    triton_ssd.PARTS = captured
    try:
        errs = compare(triton_ssd.ssd_triton, ins, chunk, a.seed)
    finally:
        triton_ssd.PARTS = None
    parts = {k: v.detach().cpu() for k, v in captured.items()}
    dA = dA_from_parts(parts, b, h, chunk)
    print(f"{a.case} seed {a.seed} {a.dtype} on {a.device}: dA error against float64 "
          f"{errs['dA'][0]:.2e} (norm) {errs['dA'][1]:.2e} (max); dA from the parts {dA.tolist()}")
    if a.out:
        torch.save(dict(case=a.case, seed=a.seed, dtype=a.dtype, device=a.device, parts=parts,
                        errs=errs, dA=dA), a.out)
    if a.against:
        other = torch.load(a.against)
        if (other["case"], other["seed"], other["dtype"]) != (a.case, a.seed, a.dtype):
            print(f"{a.against} is {other['case']} seed {other['seed']} {other['dtype']}: not this run",
                  file=sys.stderr)
            return 2
        op, odA = other["parts"], other["dA"]
        print(f"the other run ({other['device']}): dA error {other['errs']['dA'][0]:.2e}; dA {odA.tolist()}")
        print(f"dA relative difference, this run against the other: {rel(dA, odA):.2e}")
        for k in sorted(parts):
            print(f"  {k:11s} relative difference {rel(parts[k], op[k]):.2e}  "
                  f"max |diff| {(parts[k].double() - op[k].double()).abs().max().item():.3e}")
        print("dA with one part from the other run (relative distance to this run's dA / to the other's):")
        for k in PARTS + ("dt",):
            mixed = dict(parts)
            mixed[k] = op[k]
            d = dA_from_parts(mixed, b, h, chunk)
            print(f"  {k:11s} {rel(d, dA):.2e} / {rel(d, odA):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
