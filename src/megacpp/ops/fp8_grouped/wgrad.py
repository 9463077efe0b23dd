"""The experts' weight gradient in FP8: dW[e] = x_e^T @ g_e, groups along the reduction dim.

    fp8_grouped_wgrad(x, g, offs, num_groups) ~= torch._grouped_mm(x.t(), g, offs=offs)

x (A, K) and g (A, N) bf16, rows sorted by expert; offs (E,) int32 group ends.
The reduction runs over each expert's rows, so every scale belongs to one
group and one column: for each (expert, column of x) and (expert, column of
g) the largest magnitude over that expert's rows, rounded to a power of two
as quant.py rounds row scales (the divide is exact; only e4m3's rounding is
lost).

torch._scaled_grouped_mm's 2d x 2d case (H200, torch 2.11, BENCHMARKS.md,
eighteenth session) takes the left operand (K, M) row-major and the right
(M, N) column-major, both e4m3, flat float32 scales of E*K and E*N, and group
ends that are multiples of 16 rows: other ends trip a device-side assert.
So both operands are written transposed into buffers where each expert's
rows start on a multiple of 16, the gaps zero. The padded length is bounded
by A + 15 E (rounded up to 16): shapes stay static, as CUDA graphs need.

An expert with no rows gets a zero gradient here whatever the kernel leaves
in its slice. `emulate=True` runs the same quantization with the GEMM done in
float32 from the dequantized operands (CPU tests; the reference the GPU
kernel is checked against).
"""
from __future__ import annotations

import torch

from .quant import FP8, FP8_MAX, pow2, scale_exponent

ALIGN = 16   # rows per group the 2d x 2d FP8 kernel requires


def padded_layout(offs: torch.Tensor, rows: int, num_groups: int):
    """(expert (A,), pos (A,), padded ends (E,) int32, capacity): row r of expert
    e goes to column pos[r] of a transposed buffer of `capacity` columns in which
    each expert's rows start on a multiple of ALIGN."""
    ends = offs.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    pends = torch.cumsum(padded, 0)
    expert = torch.repeat_interleave(torch.arange(num_groups, device=offs.device), counts, output_size=rows)
    pos = torch.arange(rows, device=offs.device) - (ends - counts)[expert] + (pends - padded)[expert]
    capacity = (rows + (ALIGN - 1) * num_groups + ALIGN - 1) // ALIGN * ALIGN
    return expert, pos, pends.to(torch.int32), capacity


def quantize_groups_transposed(t: torch.Tensor, expert: torch.Tensor, pos: torch.Tensor, num_groups: int,
                               capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t (A, C) -> (q (C, capacity) e4m3 row-major with t's row r in column pos[r]
    and zeros elsewhere, dequantization scales (E * C,) float32: t[r, c] ~=
    q[c, pos[r]] * scale[expert[r] * C + c])."""
    C = t.shape[1]
    mag = t.detach().abs().float()
    amax = torch.zeros(num_groups, C, device=t.device, dtype=torch.float32)
    amax = amax.scatter_reduce(0, expert[:, None].expand(-1, C), mag, "amax")   # magnitudes >= 0
    k = scale_exponent(amax)
    live = amax > 0
    scale = torch.where(live, pow2(k), torch.ones_like(amax))
    inv = torch.where(live, pow2(-k), torch.ones_like(amax))
    q = (t.detach().float() * inv[expert]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    # index writes on float8 are not implemented everywhere: move the bytes as uint8
    out = torch.zeros(C, capacity, device=t.device, dtype=torch.uint8)
    out[:, pos] = q.view(torch.uint8).t()
    return out.view(FP8), scale.reshape(-1)


def emulated_scaled_grouped_mm_2d2d(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor,
                                    scale_b: torch.Tensor, offs: torch.Tensor,
                                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """torch._scaled_grouped_mm's 2d x 2d case in float32: out[e] = (a[:, group e] *
    scale_a[e]) @ (b[group e, :] * scale_b[e]); a (K, M), b (M, N) e4m3, scales
    (E*K,), (E*N,), offs (E,) group ends along M. Empty groups give zeros."""
    K, N, E = a.shape[0], b.shape[1], offs.shape[0]
    sa, sb = scale_a.float().view(E, K), scale_b.float().view(E, N)
    out = torch.zeros(E, K, N, dtype=torch.float32, device=a.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[e] = (a[:, start:end].float() * sa[e][:, None]) @ (b[start:end].float() * sb[e][None, :])
        start = end
    return out.to(out_dtype)


def fp8_grouped_wgrad(x: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, num_groups: int,
                      emulate: bool = False) -> torch.Tensor:
    """dW (E, K, N) in x's dtype, the GEMM in FP8 (see the module docstring)."""
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"fp8_grouped_wgrad: x has {x.shape[0]} rows, g {g.shape[0]}")
    expert, pos, pends, capacity = padded_layout(offs, x.shape[0], num_groups)
    xq, xs = quantize_groups_transposed(x, expert, pos, num_groups, capacity)    # (K, cap)
    gq, gs = quantize_groups_transposed(g, expert, pos, num_groups, capacity)    # (N, cap)
    if emulate:
        dw = emulated_scaled_grouped_mm_2d2d(xq, gq.t(), xs, gs, pends, out_dtype=x.dtype)
    else:
        dw = torch._scaled_grouped_mm(xq, gq.t(), xs, gs, offs=pends, out_dtype=x.dtype)
    counts = torch.diff(offs.to(torch.int64), prepend=offs.new_zeros(1, dtype=torch.int64))
    return torch.where((counts > 0)[:, None, None], dw, torch.zeros((), dtype=dw.dtype, device=dw.device))
