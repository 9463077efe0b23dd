"""SwiGLU, the pure-torch reference (the gated activation of the MLP and of
the MoE experts):

    swiglu(h) -> silu(h[..., :f]) * h[..., f:]      h (..., 2f) -> (..., f)

Torch's own ops in h's dtype: under bf16 the SiLU is rounded to bf16 before
the product, and autograd rounds each factor's gradient the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check(h: torch.Tensor) -> int:
    """f, the output width, after checking that h's last dimension is even (one error)."""
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension of h ({tuple(h.shape)}) must be even: [gate | up]")
    return h.shape[-1] // 2


def swiglu(h: torch.Tensor) -> torch.Tensor:
    check(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up
