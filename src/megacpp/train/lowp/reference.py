"""NVFP4 quantize-dequantize, written plainly: the oracle for lowp/nvfp4.py.

One block at a time, one element at a time, with float32 arithmetic done on
numpy float32 scalars (IEEE single precision, the same rounding torch uses)
and both roundings done by searching explicit tables of every representable
value: the e2m1 grid and every finite float8 e4m3fn number decoded from its
bits. Nothing here calls torch's float8 cast, so the tests check that too.
Slow; for small test tensors only.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BLOCK = 16
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # index = 3-bit magnitude code


def e4m3_value(code: int) -> float:
    """Decode a non-negative float8 e4m3fn code (0..126): 4 exponent bits (bias 7), 3 mantissa bits."""
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0:  # subnormal
        return mantissa / 8 * 2.0 ** -6
    return (1 + mantissa / 8) * 2.0 ** (exponent - 7)


# 0x7F is NaN in e4m3fn (no infinities); codes 0..126 are the finite non-negative values, in order.
E4M3_VALUES = [e4m3_value(c) for c in range(127)]


def round_to_table(v: float, table: list[float]) -> int:
    """Index of the table value nearest to v >= 0; a tie goes to the even index.

    Both tables are sorted and their index is the binary code, so an even
    index is a code whose last mantissa bit is 0: round-half-to-even.
    Values past the end saturate to the last entry.
    """
    best = 0
    for i, t in enumerate(table):
        d, dbest = abs(v - t), abs(v - table[best])
        if d < dbest or (d == dbest and i % 2 == 0 and best % 2 == 1):
            best = i
    return best


def nvfp4_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q values float32, block scale e4m3 codes uint8, global scale float32, dequantized float32).

    x: (..., K) with K a multiple of 16; blocks run along the last dim.
    """
    f32 = np.float32
    flat = x.detach().float().reshape(-1, x.shape[-1]).tolist()
    K = x.shape[-1]
    assert K % BLOCK == 0
    amax = f32(0.0)
    for row in flat:
        for val in row:
            amax = max(amax, abs(f32(val)))
    g = f32(1.0) if amax == 0 else amax / f32(6 * 448)
    q_out, code_out, deq_out = [], [], []
    for row in flat:
        q_row, code_row, deq_row = [], [], []
        for b in range(K // BLOCK):
            block = [f32(v) for v in row[b * BLOCK:(b + 1) * BLOCK]]
            bmax = max(abs(v) for v in block)
            ratio = min((bmax / f32(6)) / g, f32(448))
            code = round_to_table(float(ratio), E4M3_VALUES)
            s = f32(E4M3_VALUES[code])
            scale = s * g
            code_row.append(code)
            for v in block:
                if scale > 0:
                    mag = E2M1_VALUES[round_to_table(float(abs(v / scale)), E2M1_VALUES)]
                else:
                    mag = 0.0
                q = f32(math.copysign(mag, float(v)))
                q_row.append(q)
                deq_row.append((q * s) * g)
        q_out.append(q_row)
        code_out.append(code_row)
        deq_out.append(deq_row)
    shape = x.shape
    return (torch.tensor(np.array(q_out, dtype=np.float32)).reshape(shape),
            torch.tensor(np.array(code_out, dtype=np.uint8)).reshape(*shape[:-1], K // BLOCK),
            torch.tensor(g, dtype=torch.float32),
            torch.tensor(np.array(deq_out, dtype=np.float32)).reshape(shape))
