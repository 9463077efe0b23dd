"""Sweep the Triton gated delta rule's launch parameters on this GPU (issue 8).

Until now the launches of ops/delta_rule/triton_delta_rule.py were chosen by
compiling for sm_90 on a CPU (no spills, fits in shared memory), never timed.
For each kernel: coordinate descent over its BK / BV tiles, num_warps and
num_stages (the others held at their best so far) at one layer's shape;
every variant's outputs (o, final state, dq, dk, dv, dg, dbeta) are checked
against the default launch's, and one that differs by more than --tol
(relative norm) or fails to compile or fit is dropped. Each kernel's own time
comes from torch.profiler. Then the chosen set and the defaults are timed end
to end (forward + backward, CUDA events) at every --shapes entry; a table and
the TUNED line are printed last.

    python benchmarks/delta_tune.py [--tune-shape 16,2048,6,128,128] \\
        [--shapes 16,2048,6,128,128 8,2048,16,128,128] [--kernels wy_fwd state_fwd ...] [--json OUT]

Shapes are batch,seqlen,heads,dk,dv (nam-125m's layer and nam-1b's by
default); chunk 64, bf16, no initial state, as the model calls it.
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from megacpp.ops.delta_rule import triton_delta_rule as T
from tune_util import Target, tune_main

_TILES = {"BK": [32, 64, 128], "BV": [16, 32, 64, 128]}
_LAUNCH = {"num_warps": [2, 4, 8], "num_stages": [1, 2, 3]}
OPTIONS = {
    "wy_fwd": {**_TILES, **_LAUNCH},
    "state_fwd": {"BV": _TILES["BV"], **_LAUNCH},   # BK is the whole dk there (the state block)
    "out_fwd": {**_TILES, **_LAUNCH},
    "dw_local": {**_TILES, **_LAUNCH},
    "state_bwd": {"BV": _TILES["BV"], **_LAUNCH},
    "dqk": {**_TILES, **_LAUNCH},
    "wy_bwd": {**_TILES, **_LAUNCH},
}
KERNEL_NAME = {k: f"_{k}_kernel" for k in OPTIONS}
CHUNK = 64


def make_inputs(shape, seed=0):
    b, l, h, dk, dv = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    q = F.normalize(torch.randn(b, l, h, dk, **kw), dim=-1).bfloat16()
    k = F.normalize(torch.randn(b, l, h, dk, **kw), dim=-1).bfloat16()
    v = F.silu(torch.randn(b, l, h, dv, **kw)).bfloat16()
    A = torch.empty(h, device="cuda").uniform_(1.0, 16.0, generator=gen)
    dt = torch.exp(torch.empty(b, l, h, device="cuda").uniform_(math.log(1e-3), math.log(0.1), generator=gen))
    g = -A * dt
    beta = torch.sigmoid(torch.randn(b, l, h, **kw))
    do = torch.randn(b, l, h, dv, **kw).bfloat16()
    return q, k, v, g, beta, do


def fwd_bwd(inputs):
    *args, do = inputs
    leaves = [t.detach().clone().requires_grad_(True) for t in args]
    T._STAGES.clear()  # no fallback remembered from another variant
    o, final = T.gated_delta_rule_triton(*leaves, chunk_size=CHUNK)
    o.backward(do)
    return [o.detach(), final.detach()] + [t.grad for t in leaves]


def main(argv=None) -> int:
    target = Target("gated delta rule fwd+bwd (bf16, chunk 64)", "batch,seqlen,heads,dk,dv", T, OPTIONS, KERNEL_NAME, make_inputs, fwd_bwd)
    return tune_main(target, argv, "delta_tune", "16,2048,6,128,128",
                     ["16,2048,6,128,128", "8,2048,16,128,128"], OPTIONS)


if __name__ == "__main__":
    sys.exit(main())
