"""The pure-torch reference of the FP8 grouped GEMM: the same quantization, the
scaled GEMM emulated in float32 (dequantize, multiply per group, round).

`emulated_scaled_grouped_mm` has torch._scaled_grouped_mm's signature for the
2-D x 3-D case the experts use (`emulated_scaled_grouped_mm_2d2d` for the 2-D x
2-D case of their FP8 weight gradient); `fp8_grouped_mm_reference` is
`fp8_grouped_mm`'s, through the same autograd function with this GEMM.
"""
from __future__ import annotations

import torch


def _groups(offs: torch.Tensor):
    """(expert, start, end) per group from the int32 group ends."""
    start = 0
    for e, end in enumerate(offs.tolist()):
        yield e, start, end
        start = end


def emulated_scaled_grouped_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                               offs: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16,
                               use_fast_accum: bool = False) -> torch.Tensor:
    """out[rows of group e] = (a_rows * scale_a) @ (b[e] * scale_b[e]), in float32.

    a (M, K) e4m3, b (E, K, N) e4m3, scale_a (M,), scale_b (E, N) float32,
    offs (E,) int32 group ends; rows past offs[-1] are zero (as the kernel
    leaves them unwritten, the reference writes zeros). use_fast_accum is the
    kernel's accumulation choice; float32 here either way."""
    M, N = a.shape[0], b.shape[-1]
    af = a.float() * scale_a.float()[:, None]
    out = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    for e, s, t in _groups(offs):
        if t > s:
            out[s:t] = af[s:t] @ (b[e].float() * scale_b[e].float()[None, :])
    return out.to(out_dtype)


def emulated_scaled_grouped_mm_2d2d(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor,
                                    scale_b: torch.Tensor, offs: torch.Tensor,
                                    out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """torch._scaled_grouped_mm's 2d x 2d case (groups along the reduction dim, the
    experts' weight gradient: wgrad.py) in float32: out[e] = (a[:, group e] *
    scale_a[e]) @ (b[group e, :] * scale_b[e]); a (K, M), b (M, N) e4m3, scales
    (E*K,), (E*N,), offs (E,) group ends along M. Empty groups give zeros."""
    K, N, E = a.shape[0], b.shape[1], offs.shape[0]
    sa, sb = scale_a.float().view(E, K), scale_b.float().view(E, N)
    out = torch.zeros(E, K, N, dtype=torch.float32, device=a.device)
    for e, s, t in _groups(offs):
        if t > s:
            out[e] = (a[:, s:t].float() * sa[e][:, None]) @ (b[s:t].float() * sb[e][None, :])
    return out.to(out_dtype)


def grouped_wgrad_reference(x: torch.Tensor, g: torch.Tensor, offs: torch.Tensor, num_groups: int) -> torch.Tensor:
    """dW[e] = x[rows of e]^T @ g[rows of e] (float32 accumulate, x's dtype out):
    torch._grouped_mm(x.t(), g, offs)'s result, for where that op does not run."""
    dw = torch.zeros(num_groups, x.shape[1], g.shape[1], dtype=torch.float32, device=x.device)
    for e, s, t in _groups(offs):
        if t > s:
            dw[e] = x[s:t].float().t() @ g[s:t].float()
    return dw.to(x.dtype)


def fp8_grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, quant: str | None = None,
                             fp8_wgrad: bool = False) -> torch.Tensor:
    """fp8_grouped_mm's signature and rounding, every GEMM emulated in float32
    (quant is accepted for the signature; the emulation quantizes in pure torch)."""
    from .grouped import FP8GroupedMM
    return FP8GroupedMM.apply(x, w, offs, "emulate", fp8_wgrad)
