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

import sys

import torch

from megacpp.ops.ssd import triton_ssd as T
from tune_util import Target, tune_main

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


def main(argv=None) -> int:
    target = Target("SSD fwd+bwd (bf16, chunk 128)", "batch,seqlen,heads,headdim,groups,state", T, OPTIONS, KERNEL_NAME, make_inputs, fwd_bwd)
    return tune_main(target, argv, "ssd_tune", "8,2048,24,64,1,128",
                     ["8,2048,24,64,1,128", "16,2048,24,64,1,128", "8,2048,64,64,1,128"], OPTIONS)


if __name__ == "__main__":
    sys.exit(main())
