"""Gated RMSNorm, the pure-torch reference (the output norm of Mamba-2/3 and
Gated DeltaNet):

    gated_rms_norm(x, z, weight, eps, group_size=None, norm_before_gate=False) -> y like x

norm_before_gate=False (Mamba-2): y = norm(x * silu(z)) * weight
norm_before_gate=True (Gated DeltaNet, Mamba-3): y = norm(x) * weight * silu(z)

norm(s) = s / sqrt(mean(s^2) + eps), the mean over consecutive groups of
`group_size` channels of the last dimension (None: the whole dimension).
Statistics and products are taken in float32 (float64 stays float64); the
result is rounded once, to x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _fp(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def check(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int | None) -> int:
    """The group size, after checking the shapes (one error naming the argument)."""
    d = x.shape[-1]
    if z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z has shape {tuple(z.shape)}, x has {tuple(x.shape)}")
    if weight.shape != (d,):
        raise ValueError(f"gated_rms_norm: weight has shape {tuple(weight.shape)}, expected ({d},)")
    g = group_size or d
    if g < 1 or d % g:
        raise ValueError(f"gated_rms_norm: group_size {group_size} does not divide the last dimension {d}")
    return g


def gated_rms_norm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                   group_size: int | None = None, norm_before_gate: bool = False) -> torch.Tensor:
    g = check(x, z, weight, group_size)
    xf = _fp(x)
    zf = z.to(xf.dtype)
    if not norm_before_gate:
        xf = xf * F.silu(zf)
    shape = xf.shape
    s = xf.reshape(*shape[:-1], shape[-1] // g, g)
    s = s * torch.rsqrt(s.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = s.reshape(shape) * weight.to(xf.dtype)
    if norm_before_gate:
        y = y * F.silu(zf)
    return y.to(x.dtype)
