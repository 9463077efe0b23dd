"""SwiGLU, the pure-torch reference (the gated activation of the MLP and of
the MoE experts):

    swiglu(h, scale=None) -> silu(h[..., :f]) * h[..., f:] [* scale[..., None]]
                                                    h (..., 2f) -> (..., f)

Torch's own ops in h's dtype: under bf16 the SiLU is rounded to bf16 before
the product, and autograd rounds each factor's gradient the same way.
`scale` (h.shape[:-1], e.g. the MoE's per-row gates, float32) multiplies
each row after that product is rounded, in float32 (or h's dtype where it
is wider), rounded once to h's dtype; its gradient is the row sum of
d(y) * the unscaled product, in that dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check(h: torch.Tensor) -> int:
    """f, the output width, after checking that h's last dimension is even (one error)."""
    if h.dim() < 1 or h.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension of h ({tuple(h.shape)}) must be even: [gate | up]")
    return h.shape[-1] // 2


def check_scale(h: torch.Tensor, scale: torch.Tensor | None) -> None:
    """scale, if given, holds one number a row of h (h.shape[:-1])."""
    if scale is not None and tuple(scale.shape) != tuple(h.shape[:-1]):
        raise ValueError(f"swiglu: scale has shape {tuple(scale.shape)}, expected one number a row of h: "
                         f"{tuple(h.shape[:-1])}")


def scale_rows(y: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """y * scale[..., None] in float32 (or y's dtype where wider), rounded once to y's dtype."""
    if scale is None:
        return y
    op = torch.promote_types(y.dtype, torch.float32)
    return (y.to(op) * scale.to(op).unsqueeze(-1)).to(y.dtype)


def swiglu(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    check(h)
    check_scale(h, scale)
    gate, up = h.chunk(2, dim=-1)
    return scale_rows(F.silu(gate) * up, scale)
