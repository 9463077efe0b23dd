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

from dataclasses import dataclass

import torch

from .quant import FP8, FP8_MAX, pow2, scale_exponent
from .reference import emulated_scaled_grouped_mm_2d2d

ALIGN = 16   # rows per group the 2d x 2d FP8 kernel requires


@dataclass(frozen=True)
class PaddedLayout:
    """Where each expert's rows go in a buffer of `capacity` rows (a multiple of
    ALIGN) in which every expert starts on a multiple of ALIGN.
    expert (A,), pos (A,): row r of expert[r] goes to padded row pos[r].
    src (capacity,): the row each padded row holds, -1 for the gaps and the tail.
    ends (E,) int32: the padded group ends (the kernel's offs).
    blocks (E + 1,): ALIGN-row blocks per expert, then the tail's."""
    expert: torch.Tensor
    pos: torch.Tensor
    src: torch.Tensor
    ends: torch.Tensor
    blocks: torch.Tensor
    capacity: int


def padded_layout(offs: torch.Tensor, rows: int, num_groups: int) -> PaddedLayout:
    """The padded layout of `rows` rows grouped by the int32 ends `offs` (E,)."""
    dev = offs.device
    ends = offs.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + ALIGN - 1) // ALIGN * ALIGN
    pends = torch.cumsum(padded, 0)
    expert = torch.repeat_interleave(torch.arange(num_groups, device=dev), counts, output_size=rows)
    pos = torch.arange(rows, device=dev) - (ends - counts)[expert] + (pends - padded)[expert]
    capacity = (rows + (ALIGN - 1) * num_groups + ALIGN - 1) // ALIGN * ALIGN
    src = torch.full((capacity,), -1, device=dev, dtype=torch.int64).scatter(
        0, pos, torch.arange(rows, device=dev))
    blocks = padded // ALIGN
    tail = capacity // ALIGN - blocks.sum()
    return PaddedLayout(expert, pos, src, pends.to(torch.int32), torch.cat([blocks, tail.reshape(1)]), capacity)


def quantize_groups_transposed(t: torch.Tensor, lay: PaddedLayout, num_groups: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """t (A, C) -> (q (C, capacity) e4m3 row-major with t's row r in column
    lay.pos[r] and zeros elsewhere, dequantization scales (E * C,) float32:
    t[r, c] ~= q[c, pos[r]] * scale[expert[r] * C + c]).

    Each expert's column maxima without atomics: the padded rows' maxima per
    ALIGN-row block (every block belongs to one expert), then a segmented max
    over each expert's blocks. Compiled, inductor fuses the gather into both
    passes over t: two reads of t and one write of q."""
    C, cap = t.shape[1], lay.capacity
    rows = torch.where((lay.src >= 0)[:, None], t.detach()[lay.src.clamp_min(0)], 0)     # (cap, C)
    block_max = rows.abs().view(cap // ALIGN, ALIGN, C).amax(1).float()
    amax = torch.segment_reduce(block_max, "max", lengths=lay.blocks, axis=0, unsafe=True,
                                initial=0)[:num_groups]                                    # (E, C)
    k = scale_exponent(amax)
    live = amax > 0
    scale = torch.where(live, pow2(k), torch.ones_like(amax))
    inv = torch.cat([torch.where(live, pow2(-k), torch.ones_like(amax)), amax.new_ones(1, C)])
    group_of_row = torch.repeat_interleave(torch.arange(num_groups + 1, device=t.device), lay.blocks * ALIGN,
                                           output_size=cap)
    q = (rows.float() * inv[group_of_row]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    # the transposed copy as bytes (float8 copies are not implemented everywhere)
    return q.view(torch.uint8).t().contiguous().view(FP8), scale.reshape(-1)


def fp8_grouped_wgrad(x: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, num_groups: int,
                      emulate: bool = False) -> torch.Tensor:
    """dW (E, K, N) in x's dtype, the GEMM in FP8 (see the module docstring)."""
    if x.shape[0] != g.shape[0]:
        raise ValueError(f"fp8_grouped_wgrad: x has {x.shape[0]} rows, g {g.shape[0]}")
    lay = padded_layout(offs, x.shape[0], num_groups)
    xq, xs = quantize_groups_transposed(x, lay, num_groups)    # (K, cap)
    gq, gs = quantize_groups_transposed(g, lay, num_groups)    # (N, cap)
    if emulate:
        dw = emulated_scaled_grouped_mm_2d2d(xq, gq.t(), xs, gs, lay.ends, out_dtype=x.dtype)
    else:
        dw = torch._scaled_grouped_mm(xq, gq.t(), xs, gs, offs=lay.ends, out_dtype=x.dtype)
    has_rows = lay.blocks[:num_groups] > 0     # a padded expert has blocks iff it has rows
    return torch.where(has_rows[:, None, None], dw, torch.zeros((), dtype=dw.dtype, device=dw.device))
