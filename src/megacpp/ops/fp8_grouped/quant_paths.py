"""Which quantizer feeds the FP8 grouped GEMM: torchao's Triton kernels or the pure-torch one.

Three operands, each quantized per slice along its GEMM's reduction dim:
    rows(t)          t (M, K) -> q (M, K) row-major, dequant scales (M,)
    weight_fwd(w)    w (E, K, N) -> q (E, K, N) column-major, scales (E, N)
    weight_dgrad(w)  w (E, K, N) -> q = w^T (E, N, K) column-major, scales (E, K)

"torch" is quant.py, which inductor fuses into the kernel that produces the
operand (the expert-row gather, the SwiGLU and its backward). "torchao" takes
torchao's fused Triton kernels (torchao.prototype.moe_training.kernels: one
program per row, amax then scale-and-cast from L2) on the materialized bf16
operand. Both round scales to powers of two, so they give the same bytes (a
CUDA test holds them to that).

Measured on nam-1b at micro batch 32 with FP8 dense GEMMs (H200, BENCHMARKS.md):
"torch" +1.4% to +2.2% tokens/s over FP8 dense alone in four runs on three
cards, "torchao" -0.2% to 0.0% in three (sixteenth session); in isolation
(benchmarks/fp8_grouped_bench.py) torchao's is the faster at nam-1b's shapes
and the slower at nam-125m's.

"triton" (triton_quant.py, this project's) quantizes the 2-D operands in one
pass with whole rows in registers, the same bytes again (the weights as
"torch"): +0.6% to +0.9% tokens/s over "torch" on each of four cards, both
orders (nam-1b as above, seventeenth session), so the default where it
imports.

MEGACPP_FP8_QUANT = auto (default: "triton" on CUDA where its kernel imports,
else "torch") | torch | torchao | triton (an error where its kernels do not
import). The run records the one that ran (the manifest's GEMM plan, the
bench's precision line).
"""
from __future__ import annotations

import functools
import os

import torch

from .quant import FP8, column_major, quantize_fp8

ENV = "MEGACPP_FP8_QUANT"


@functools.lru_cache(maxsize=1)
def torchao_import_error() -> str:
    """'' when torchao's FP8 quantization kernels import, else why not."""
    try:
        from torchao.prototype.moe_training.kernels import (  # noqa: F401
            triton_fp8_colwise_3d_scale_and_cast, triton_fp8_rowwise_2d_scale_and_cast,
            triton_fp8_rowwise_3d_transpose_rhs)
    except Exception as e:  # ImportError, or a torchao built for another torch/triton
        return f"torchao's FP8 quantization kernels do not import ({type(e).__name__}: {str(e)[:120]})"
    return ""


def triton_import_error() -> str:
    """'' when this project's Triton quantization kernel imports, else why not."""
    from .._backend import kernels_import_error
    return kernels_import_error(f"{__package__}.triton_quant")


def quant_choice() -> str:
    """MEGACPP_FP8_QUANT as asked: "auto" (unset) or one of QUANT."""
    v = os.environ.get(ENV, "auto").strip() or "auto"
    if v != "auto" and v not in QUANT:
        raise ValueError(f"{ENV}={v!r}: expected auto or one of {', '.join(QUANT)}")
    return v


TRITON_MAX_ROW = 8192   # triton_quant.MAX_K, here so that choosing needs no triton import


def quant_path(device: torch.device, widest_row: int = 0) -> str:
    """'torch', 'torchao' or 'triton': the quantizer the FP8 grouped GEMM uses on
    `device` for operands whose rows are at most `widest_row` elements (0: not
    known). The Triton kernel holds whole rows in registers, up to
    TRITON_MAX_ROW: "auto" takes pure torch past it, an explicit "triton" fails."""
    v = quant_choice()
    if v == "torch" or device.type != "cuda":
        return "torch"
    if v == "auto":   # the one-pass kernel where it imports (it is CUDA-only) and rows fit, else pure torch
        return "torch" if triton_import_error() or widest_row > TRITON_MAX_ROW else "triton"
    why = torchao_import_error() if v == "torchao" else triton_import_error()
    if v == "triton" and not why and widest_row > TRITON_MAX_ROW:
        why = f"rows of {widest_row} elements exceed the Triton quantizer's {TRITON_MAX_ROW}"
    if why:
        raise RuntimeError(f"{ENV}={v}: {why}")
    return v


class TorchQuant:
    @staticmethod
    def rows(t):
        q, s = quantize_fp8(t, dim=-1)
        return q, s.squeeze(-1)

    @staticmethod
    def weight_fwd(w):
        q, s = quantize_fp8(w, dim=1)
        return column_major(q), s.squeeze(1)

    @staticmethod
    def weight_dgrad(w):
        q, s = quantize_fp8(w, dim=2)
        return q.transpose(-2, -1), s.squeeze(-1)


class TorchaoQuant:
    """torchao's kernels return quantization multipliers (448 / amax, rounded
    down to a power of two); their reciprocals are the dequant scales, exact."""

    @staticmethod
    def rows(t):
        from torchao.prototype.moe_training.kernels import triton_fp8_rowwise_2d_scale_and_cast
        q, s = triton_fp8_rowwise_2d_scale_and_cast(t.contiguous(), FP8, True)
        return q, s.squeeze(-1).reciprocal()

    @staticmethod
    def weight_fwd(w):
        from torchao.prototype.moe_training.kernels import triton_fp8_colwise_3d_scale_and_cast
        q, s = triton_fp8_colwise_3d_scale_and_cast(column_major(w), FP8, True)
        return q, s.squeeze(1).reciprocal()

    @staticmethod
    def weight_dgrad(w):
        from torchao.prototype.moe_training.kernels import triton_fp8_rowwise_3d_transpose_rhs
        q, s = triton_fp8_rowwise_3d_transpose_rhs(w.contiguous(), FP8, True)
        return q, s.reciprocal()


class TritonQuant(TorchQuant):
    """The 2-D operands through triton_quant.fp8_rows_triton; the weights as TorchQuant."""

    @staticmethod
    def rows(t):
        from .triton_quant import fp8_rows_triton
        return fp8_rows_triton(t)


QUANT = {"torch": TorchQuant, "torchao": TorchaoQuant, "triton": TritonQuant}
