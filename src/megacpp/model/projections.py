"""Several projections of one input as one GEMM.

    project(x, q_proj, k_proj, v_proj) -> (q, k, v)

Attention's q/k/v and Gated DeltaNet's six input projections read the same
x. Run separately they are one GEMM each (Gated DeltaNet's gate rows are
768 -> 6: a GEMM that is all overhead), each backward adds its d(x) into the
others'; concatenated along the output dimension they are one GEMM forward,
one for d(x) and one for d(weight). The parameters stay separate modules
(names, shapes, checkpoints and the Megatron mapping unchanged); the
concatenated weight is a per-call copy, small next to the activations.

Only plain nn.Linear modules without bias are fused: a subclass (torchao's
Float8Linear, the NVFP4 emulation) has its own forward, which must run, so
any such module makes every projection of the call run on its own.
Off by default: on an H200 (2026-11-28, BENCHMARKS.md) the fused calls did
not shorten the step: GPU busy 92.5 ms with them against 91.1 without at
nam-125m, 275.9 against 273.4 at nam-1b, matmul time unchanged (32.5 and
32.6 ms; 135.2 and 135.0). MEGACPP_FUSED_PROJECTIONS=1 turns the fusion on;
it is read when a call is traced or run.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def fusion_enabled() -> bool:
    v = os.environ.get("MEGACPP_FUSED_PROJECTIONS", "0").strip()
    if v not in ("0", "1"):
        raise ValueError(f"MEGACPP_FUSED_PROJECTIONS={v!r}: expected 0 or 1")
    return v == "1"


def fusable(linears) -> bool:
    """Whether these modules can run as one GEMM: plain nn.Linear, no bias, one input width."""
    return (len(linears) > 1 and all(type(m) is nn.Linear and m.bias is None for m in linears)
            and len({m.in_features for m in linears}) == 1)


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """(linear(x) for linear in linears), as one GEMM where fusable() and enabled."""
    if not (fusable(linears) and fusion_enabled()):
        return tuple(m(x) for m in linears)
    w = torch.cat([m.weight for m in linears], dim=0)
    return F.linear(x, w).split([m.out_features for m in linears], dim=-1)
