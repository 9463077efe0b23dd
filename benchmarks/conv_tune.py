"""Sweep the Triton causal conv kernels' launch parameters on this GPU (issue 8).

For each kernel of ops/causal_conv/triton_conv.py on one path (--path
walk: fwd_walk, bwd_walk, the default; --path tiles: fwd, dpre, dx;
--path fused: bwd_fused, the one-pass backward, its forward the walk),
coordinate descent over its launch options at one conv's shape
(benchmarks/tune_util.py); every variant's outputs (y, dx, d(weight),
d(bias)) are checked against the default launch's. Then the chosen set and
the defaults are timed end to end (fwd + bwd, CUDA events) at every
--shapes entry, and a table is printed last with the TUNED line to paste.
--paths first times the paths' defaults against each other (and checks
they agree) at every shape.

    python benchmarks/conv_tune.py [--path walk|tiles|fused] [--kernels K ...] [--paths] [--tune-shape 8,2048,1792,4] [--shapes ...] [--json OUT]

Shapes are batch,seqlen,channels,K: mamba2-130m's / nam-125m's M conv
(1792 channels, bias), nam-125m's R convs (768, no bias) by default;
packed rows (random documents), bf16, SiLU fused.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from megacpp.ops.causal_conv import triton_conv as T
from tune_util import Target, sweep

OPTIONS = {
    name: {"BT": [16, 32, 64, 128], "BC": [32, 64, 128, 256], "num_warps": [1, 2, 4, 8],
           "num_stages": [1, 2, 3]}
    for name in T.KERNELS
}
# dpre's rows per inner step first: one pass over BT = 64 spills (255 registers and
# 80 bytes of stack a thread on sm_90, benchmarks/triton_registers.py --ops conv),
# 32 rows at a time need 204 registers and no stack
OPTIONS["dpre"] = {"RT": [8, 16, 32], "BT": [32, 64, 128, 256], "BC": [32, 64, 128, 256],
                   "num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}
# the walks: rows a program walks (unrolled), channels a program, warps
for _k in ("fwd_walk", "bwd_walk"):
    OPTIONS[_k] = {"BT": [8, 16, 32, 64], "BC": [32, 64, 128, 256, 512], "num_warps": [1, 2, 4],
                   "num_stages": [1, 2]}
# the one-pass backward: K tiles of g live at once, so smaller tiles than the two passes'
OPTIONS["bwd_fused"] = {"BT": [8, 16, 32, 64], "BC": [32, 64, 128], "num_warps": [1, 2, 4, 8],
                        "num_stages": [1, 2]}
KERNEL_NAME = {"fwd": "_conv_fwd_kernel", "dpre": "_conv_dpre_kernel", "dx": "_conv_dx_kernel",
               "fwd_walk": "_conv_fwd_walk_kernel", "bwd_walk": "_conv_bwd_walk_kernel",
               "bwd_fused": "_conv_bwd_fused_kernel"}
PATH_KERNELS = {"walk": ["fwd_walk", "bwd_walk"], "tiles": ["fwd", "dpre", "dx"], "fused": ["bwd_fused"]}
# (forward, backward) path of each --path
PATH_PAIR = {"walk": ("walk", "walk"), "tiles": ("tiles", "tiles"), "fused": ("walk", "fused")}


def make_inputs(shape, seed=0):
    """Packed rows; a bias unless the channels are 768 (nam-125m's R convs have none)."""
    b, l, c, K = shape
    bias = c != 768
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


def compare_paths(target: Target, shapes: list[str], tol: float) -> list[dict]:
    """fwd + bwd ms of each path's default launch at each shape, outputs checked against each other."""
    from tune_util import rel, total_ms
    rows = []
    for s in shapes:
        inp = make_inputs(target.parse_shape(s), 2)  # checked like the sweep's shapes
        res = {}
        for p in ("tiles", "fused", "walk"):
            T.PATH.update(zip(("fwd", "bwd"), PATH_PAIR[p]))
            res[p] = (fwd_bwd(inp), total_ms(lambda: fwd_bwd(inp)))
        T.PATH.update(fwd="walk", bwd="walk")
        err = max(rel(a, b) for p in ("tiles", "fused") for a, b in zip(res["walk"][0], res[p][0]))
        rows.append({"shape": s, "tiles_ms": res["tiles"][1], "fused_ms": res["fused"][1],
                     "walk_ms": res["walk"][1], "max_rel_err": err})
    print(f"\n{'shape':24} {'tiles ms':>9} {'fused ms':>9} {'walk ms':>8} {'max rel err':>12}")
    for r in rows:
        print(f"{r['shape']:24} {r['tiles_ms']:9.3f} {r['fused_ms']:9.3f} {r['walk_ms']:8.3f} "
              f"{r['max_rel_err']:12.1e}{'  MISMATCH' if not r['max_rel_err'] <= tol else ''}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tune-shape", default="8,2048,1792,4")
    ap.add_argument("--shapes", nargs="+", default=["8,2048,1792,4", "16,2048,1792,4", "16,2048,768,4"])
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--path", choices=sorted(PATH_KERNELS), default="walk", help="the kernels tuned")
    ap.add_argument("--kernels", nargs="+", help="only these of the path's kernels (default: all of them)")
    ap.add_argument("--paths", action="store_true", help="first time the paths' defaults at --shapes")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("conv_tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    target = Target("causal conv fwd+bwd (bf16, packed, SiLU)", "batch,seqlen,channels,K",
                    T, OPTIONS, KERNEL_NAME, make_inputs, fwd_bwd)
    paths = compare_paths(target, args.shapes, args.tol) if args.paths else None
    T.PATH.update(zip(("fwd", "bwd"), PATH_PAIR[args.path]))
    kernels = args.kernels or PATH_KERNELS[args.path]
    if set(kernels) - set(PATH_KERNELS[args.path]):
        ap.error(f"--kernels {kernels}: the {args.path} path's kernels are {PATH_KERNELS[args.path]}")
    out = sweep(target, args.tune_shape, args.shapes, kernels, args.tol)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**out, "path": args.path, "paths": paths}, f, indent=1)
    bad = paths and any(not r["max_rel_err"] <= args.tol for r in paths)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
