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


def scale_exponent(amax: torch.Tensor) -> torch.Tensor:
    """k (int32) of the smallest power of two 2^k with amax / 2^k <= 448, read
    exactly from amax's float32 bits (no division, no log: every kernel that
    computes it agrees to the bit). amax = 1.f x 2^E: 448 = 1.75 x 2^8, so
    k = E - 8 when 1.f <= 1.75 (mantissa bits <= 0x600000), else E - 7.
    Clamped to float32's normal range."""
    bits = amax.float().view(torch.int32)
    e = (bits >> 23) & 0xFF
    k = e - 135 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    return k.clamp(-126, 127)


def pow2(k: torch.Tensor) -> torch.Tensor:
    """2.0 ** k (float32) for int32 k in [-126, 127], built from its bits."""
    return ((k + 127) << 23).view(torch.float32)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The dequantization scale (a power of two, float32) for rows whose largest
    magnitude is `amax`; all-zero rows get 1 (their quantized values are 0)."""
    s = pow2(scale_exponent(amax))
    return torch.where(amax > 0, s, torch.ones_like(s))


def quantize_fp8(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): q (t's shape, e4m3) and scale (float32, size 1 along `dim`)
    with t ~= q.float() * scale; one scale per slice along `dim` (the GEMM's
    reduction dim, so the scales factor out of every dot product). The values
    are multiplied by 1 / scale, itself a power of two: exact."""
    amax = t.abs().amax(dim=dim, keepdim=True).float()
    k = scale_exponent(amax)
    live = amax > 0
    scale = torch.where(live, pow2(k), torch.ones_like(amax))
    inv = torch.where(live, pow2(-k), torch.ones_like(amax))
    q = (t.float() * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def column_major(q: torch.Tensor) -> torch.Tensor:
    """The same (..., K, N) values laid out with K contiguous (what the FP8
    grouped GEMM takes as its right operand)."""
    return q.transpose(-2, -1).contiguous().transpose(-2, -1)
