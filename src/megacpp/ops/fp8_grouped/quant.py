"""Rowwise FP8 (e4m3) quantization for the grouped expert GEMMs, pure torch.

Each row (or column) of a bf16 operand along the GEMM's reduction dim gets
one float32 scale, a power of two chosen so the row's largest magnitude lands
in (224, 448] (448 = e4m3's largest finite value). Powers of two make the
divide exact: dequantizing (q * scale) recovers the value up to e4m3's
rounding alone. Compiled, inductor fuses the amax, the divide and the cast
into one pass over the operand.
"""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The dequantization scale (a power of two, float32) for rows whose largest
    magnitude is `amax`; all-zero rows get 1 (their quantized values are 0)."""
    a = amax.float()
    s = torch.exp2(torch.ceil(torch.log2(a / FP8_MAX)))
    return torch.where(a > 0, s, torch.ones_like(s))


def quantize_fp8(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q (t's shape, e4m3) and scale (float32, size 1 along `dim`)
    with t ~= q.float() * scale; one scale per slice along `dim` (the GEMM's
    reduction dim, so the scales factor out of every dot product)."""
    scale = fp8_scale(t.abs().amax(dim=dim, keepdim=True))
    q = (t.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def column_major(q: torch.Tensor) -> torch.Tensor:
    """The same (..., K, N) values laid out with K contiguous (what the FP8
    grouped GEMM takes as its right operand)."""
    return q.transpose(-2, -1).contiguous().transpose(-2, -1)
