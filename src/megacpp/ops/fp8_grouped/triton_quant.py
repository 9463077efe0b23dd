"""Rowwise FP8 quantization of a (M, K) bf16 operand in one Triton pass.

    fp8_rows_triton(t) -> (q (M, K) e4m3, scale (M,) float32)

the same bytes as quant.quantize_fp8(t, dim=-1) (scale squeezed): the scale's
exponent read from the row amax's bits, the values multiplied by its exact
inverse. Each program holds BR whole rows in registers (K up to MAX_K), so
the operand is read once and the FP8 copy written once — where torchao's
kernel (one row a program, two passes) and inductor's fused reduction (two
loops over each row, the producer recomputed in the second) each spend more
(sixteenth session's nam-1b profiles, BENCHMARKS.md).

A torch.library.custom_op: inductor keeps it opaque, so the operand is
materialized by its producer (the bf16 weight gradient reads it anyway) and
read here once. Importing this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_util import device_ctx as _device_ctx
from .._triton_util import p2 as _p2

FP8_MAX = tl.constexpr(448.0)
MAX_K = 8192      # a row's elements one program holds (float32 in registers); = quant_paths.TRITON_MAX_ROW
TILE = 8192       # elements a program holds: BR rows of the padded width


@triton.jit
def _round_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value, ties to even,
    still float32: the cast that follows is then exact on any backend (Triton's
    CPU interpreter rounds non-representable values wrongly: 31.5 -> 16).
    Normal range (|v| >= 2^-6): keep 3 mantissa bits of v's bits; below it
    e4m3's subnormals are multiples of 2^-9: rint(v * 512) / 512 by the
    1.5 * 2^23 trick."""
    bits = v.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576   # ~0xFFFFF
    normal = bits.to(tl.float32, bitcast=True)
    a = tl.abs(v)
    sub = ((a * 512.0 + 12582912.0) - 12582912.0) * 0.001953125
    # v's sign bit put back (a negation would turn -0.0 into +0.0, which the cast keeps)
    sub = (sub.to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32, bitcast=True)
    return tl.where(a >= 0.015625, normal, sub)


@triton.jit
def _fp8_rows_kernel(x_ptr, q_ptr, s_ptr, M, K, s_xm, s_qm, BR: tl.constexpr, BK: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BK)
    m = (r < M)[:, None] & (c < K)[None, :]
    x = tl.load(x_ptr + r.to(tl.int64)[:, None] * s_xm + c[None, :], mask=m, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    bits = amax.to(tl.int32, bitcast=True)
    k = ((bits >> 23) & 0xFF) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
    k = tl.minimum(tl.maximum(k, -126), 127)
    live = amax > 0
    scale = tl.where(live, ((k + 127) << 23).to(tl.float32, bitcast=True), 1.0)
    inv = tl.where(live, ((127 - k) << 23).to(tl.float32, bitcast=True), 1.0)
    q = _round_e4m3(tl.minimum(tl.maximum(x * inv[:, None], -FP8_MAX), FP8_MAX))
    tl.store(q_ptr + r.to(tl.int64)[:, None] * s_qm + c[None, :], q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + r, scale, mask=r < M)


def _launch(M: int, K: int) -> tuple[dict, tuple]:
    bk = _p2(K)
    br = max(1, TILE // bk)
    return {"BR": br, "BK": bk, "num_warps": 8}, (triton.cdiv(M, br),)


@torch.library.custom_op("megacpp::fp8_rows", mutates_args=())
def _fp8_rows_op(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = t.shape
    q = torch.empty(M, K, device=t.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(M, device=t.device, dtype=torch.float32)
    if M and K:
        with _device_ctx(t):
            cfg, grid = _launch(M, K)
            _fp8_rows_kernel[grid](t, q, s, M, K, t.stride(0), q.stride(0), **cfg)
    return q, s


@_fp8_rows_op.register_fake
def _(t):
    M, K = t.shape
    return t.new_empty(M, K, dtype=torch.float8_e4m3fn), t.new_empty(M, dtype=torch.float32)


def fp8_rows_triton(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a 2-D operand, rowwise; see the module docstring."""
    if t.dim() != 2:
        raise ValueError(f"fp8_rows_triton: expected a 2-D operand, got shape {tuple(t.shape)}")
    if t.shape[1] > MAX_K:
        raise ValueError(f"fp8_rows_triton: rows of {t.shape[1]} elements exceed MAX_K={MAX_K}")
    if t.stride(-1) != 1:
        t = t.contiguous()
    return _fp8_rows_op(t)
