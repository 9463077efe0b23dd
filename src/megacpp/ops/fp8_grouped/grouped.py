"""FP8 grouped GEMM for the MoE experts: torch._scaled_grouped_mm, rowwise scales.

    fp8_grouped_mm(x, w, offs) ~= torch._grouped_mm(x, w, offs=offs)

x (A, K) bf16 rows sorted by expert, w (E, K, N) bf16, offs (E,) int32 group
ends. Forward and input gradient run in FP8 (e4m3, one power-of-two scale
per row of the left operand and per column of the right, along the
reduction dim: quant.py); the weight gradient, whose reduction runs over
each expert's tokens (groups of any length, where the FP8 kernel wants
16-aligned ones), stays bf16 through torch._grouped_mm: two of the three
GEMMs per weight (torchao's Float8Linear converts all three of the dense
ones, whose rows need no grouping) — unless fp8_wgrad asks for the third
too (wgrad.py: each expert's rows padded to 16, one scale per expert and
column; policy.precision.expert_low_precision = "fp8_rowwise_wgrad").
The forward accumulates with the kernel's fast accumulation (as torchao's
output GEMM); the input gradient without it.

`fp8_grouped_unavailable(device)` says why the kernel cannot run here (no
CUDA, an FP8 grouped kernel torch does not build for this card); runs
refuse the setting then, tests take the emulated reference
(reference.fp8_grouped_mm_reference), which is this same function with
every GEMM done in float32.
"""
from __future__ import annotations

import torch

from .quant import column_major
from .quant_paths import QUANT, quant_path
from .reference import emulated_scaled_grouped_mm, grouped_wgrad_reference
from .wgrad import fp8_grouped_wgrad

BACKEND = ("torch._scaled_grouped_mm, e4m3 with power-of-two rowwise scales: forward and input gradient; "
           "weight gradient bf16 torch._grouped_mm")
BACKEND_WGRAD = ("torch._scaled_grouped_mm, e4m3 with power-of-two scales: forward and input gradient rowwise; "
                 "weight gradient per expert and column (groups padded to 16 rows, ops.fp8_grouped.wgrad)")

_PROBED: dict = {}


def fp8_grouped_unavailable(device: torch.device) -> str | None:
    """Why torch._scaled_grouped_mm cannot run the experts on `device`, or None.
    Probed once per device with a tiny call (torch builds its FP8 grouped
    kernels for some cards only: Hopper's sm_90 among them)."""
    if device.type != "cuda":
        return f"the FP8 grouped GEMM needs a CUDA device; this run is on {device.type}"
    if not hasattr(torch, "_scaled_grouped_mm"):
        return f"torch {torch.__version__} has no torch._scaled_grouped_mm"
    key = str(device)
    if key not in _PROBED:
        try:
            a = torch.zeros(32, 32, device=device, dtype=torch.float8_e4m3fn)
            b = column_major(torch.zeros(2, 32, 16, device=device, dtype=torch.float8_e4m3fn))
            offs = torch.tensor([16, 32], device=device, dtype=torch.int32)
            torch._scaled_grouped_mm(a, b, torch.ones(32, device=device), torch.ones(2, 16, device=device),
                                     offs=offs, out_dtype=torch.bfloat16)
            torch.cuda.synchronize(device)
            _PROBED[key] = None
        except (RuntimeError, NotImplementedError, TypeError) as e:
            cap = torch.cuda.get_device_capability(device)
            _PROBED[key] = (f"torch {torch.__version__}'s FP8 grouped GEMM does not run on "
                            f"{torch.cuda.get_device_name(device)} (sm_{cap[0]}{cap[1]}): "
                            f"{str(e).splitlines()[0][:160]}")
    return _PROBED[key]


MODES = (*QUANT, "emulate")


class FP8GroupedMM(torch.autograd.Function):
    """See the module docstring. mode: "torch", "torchao" or "triton" (the quantizer
    in front of torch._scaled_grouped_mm, quant_paths), or "emulate" (the pure-torch
    quantizer and every GEMM in float32: the reference). fp8_wgrad: the weight
    gradient in FP8 too (ops.fp8_grouped.wgrad: per-expert column scales), where
    it is bf16 otherwise."""

    @staticmethod
    def forward(ctx, x, w, offs, mode, fp8_wgrad=False):
        if mode not in MODES:
            raise ValueError(f"FP8GroupedMM mode {mode!r}: expected one of {MODES}")
        emulate = mode == "emulate"
        quant = QUANT["torch" if emulate else mode]
        xq, xs = quant.rows(x)                  # scales (A,)
        wq, ws = quant.weight_fwd(w)            # scales (E, N): per output column, along K
        gemm = emulated_scaled_grouped_mm if emulate else torch._scaled_grouped_mm
        y = gemm(xq, wq, xs, ws, offs, out_dtype=x.dtype, use_fast_accum=True)
        ctx.save_for_backward(x, w, offs)
        ctx.emulate, ctx.quant, ctx.fp8_wgrad = emulate, quant, fp8_wgrad
        return y

    @staticmethod
    def backward(ctx, g):
        x, w, offs = ctx.saved_tensors
        g = g.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            quant = ctx.quant
            gq, gs = quant.rows(g)              # scales (A,)
            wq, ws = quant.weight_dgrad(w)      # w^T (E, N, K), scales (E, K) along N
            gemm = emulated_scaled_grouped_mm if ctx.emulate else torch._scaled_grouped_mm
            dx = gemm(gq, wq, gs, ws, offs, out_dtype=g.dtype, use_fast_accum=False)
        if ctx.needs_input_grad[1]:
            if ctx.fp8_wgrad:
                dw = fp8_grouped_wgrad(x, g, offs, w.shape[0], emulate=ctx.emulate)
            else:
                dw = (grouped_wgrad_reference(x, g, offs, w.shape[0]) if ctx.emulate
                      else torch._grouped_mm(x.t(), g, offs=offs))
        return dx, dw, None, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, quant: str | None = None,
                   fp8_wgrad: bool = False) -> torch.Tensor:
    """torch._grouped_mm(x, w, offs=offs) with the forward and input gradient in
    FP8 (and the weight gradient, with fp8_wgrad); quant: "torch" | "torchao" |
    "triton" | None (quant_path's choice for x's device)."""
    return FP8GroupedMM.apply(x, w, offs, quant or quant_path(x.device), fp8_wgrad)
