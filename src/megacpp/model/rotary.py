"""Rotary position embedding (RoPE) with per-token positions.

Positions come in per token, (batch, seqlen), so a packed row whose
documents each restart at position 0 rotates every document exactly as if
it stood alone. Only the first `rot_dim` channels of a head are rotated
(partial rotary); the rest pass through. Pairs are (i, i + rot_dim/2), the
GPT-NeoX / Llama layout.

Nothing is cached across calls: the angles are recomputed from the
positions (a (batch, seqlen, rot_dim/2) outer product, negligible next to
the projections), which keeps the module free of buffers that would have to
be rebuilt after meta-device initialisation. Within one forward the model
computes each (rot_dim, theta) table once and shares it between layers.
"""
from __future__ import annotations

import torch

from .norm import fp


def rope_cos_sin(positions: torch.Tensor, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, rot_dim/2), float64.

    Angles are formed in float64: a float32 product of position and
    frequency loses the low bits that decide the phase at positions in the
    hundreds of thousands. apply_rotary casts to the compute dtype.
    """
    exps = torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.float64) / rot_dim
    ang = positions.double()[..., None] * (1.0 / (float(theta) ** exps))
    return torch.cos(ang), torch.sin(ang)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] channels of x.

    cos/sin broadcast against x[..., :rot/2]: attention passes
    (batch, seqlen, 1, rot/2) for x (batch, seqlen, heads, dim); Mamba-3
    passes per-head angles. Computed in float32, returned in x's dtype.
    """
    half = cos.shape[-1]
    rot = 2 * half
    xr = fp(x[..., :rot])
    x1, x2 = xr[..., :half], xr[..., half:]
    c, s = cos.to(xr.dtype), sin.to(xr.dtype)
    out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat([out, x[..., rot:]], dim=-1)
