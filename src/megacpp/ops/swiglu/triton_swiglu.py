"""Triton SwiGLU, forward and backward, one pass each over [gate | up].

Same signature and result as `reference.swiglu`:

    swiglu_triton(h) -> silu(h[..., :f]) * h[..., f:]

Importing this module imports triton; `megacpp.ops.swiglu` only does so on
first access of `swiglu_triton` (CI has no GPU).

  _swiglu_fwd_kernel  one program per (block of rows, block of f columns):
                      loads gate and up once, writes y.
  _swiglu_bwd_kernel  the same tiling: loads gate, up and dy once, writes
                      d gate and d up (nothing but h is saved).

Rounding follows the reference's ops in h's dtype: silu(gate) is rounded
before the product; d up = dy * silu(gate) and dy * up are rounded before
SiLU's backward, whose result is rounded once. The arithmetic is float32
(torch's own opmath), so under bf16 the kernels and the reference agree to
the last bit except where a float32 sigmoid differs by an ulp before a
rounding.

torch.compile: forward and backward are torch.library.custom_ops (one opaque
node each) with register_fake and register_autograd, as the other kernels
here are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_util import FLEXIBLE_LAYOUT as _FLEXIBLE
from .._triton_util import device_ctx as _device_ctx
from .._triton_util import p2 as _p2
from .reference import check as _check

# Elements of one program's (rows x columns) tile, and the widest column block.
TILE = 4096
MAX_BF = 1024


@triton.jit
def _tile(base, r, c, R, F, s_r):
    """Pointers and mask of rows r x columns c of a (R, *) tensor whose columns are contiguous."""
    return base + r.to(tl.int64)[:, None] * s_r + c[None, :], (r < R)[:, None] & (c < F)[None, :]


@triton.jit
def _swiglu_fwd_kernel(h_ptr, y_ptr, R, F, s_hr, s_yr, BR: tl.constexpr, BF: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    hp, m = _tile(h_ptr, r, c, R, F, s_hr)
    g = tl.load(hp, mask=m, other=0.0)
    u = tl.load(hp + F, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf * tl.sigmoid(gf)).to(g.dtype)            # F.silu's result in h's dtype
    yp, _ = _tile(y_ptr, r, c, R, F, s_yr)
    tl.store(yp, (s.to(tl.float32) * u.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, dy_ptr, dh_ptr, R, F, s_hr, s_dr, s_or, BR: tl.constexpr, BF: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    hp, m = _tile(h_ptr, r, c, R, F, s_hr)
    dp, _ = _tile(dy_ptr, r, c, R, F, s_dr)
    g = tl.load(hp, mask=m, other=0.0)
    u = tl.load(hp + F, mask=m, other=0.0)
    dy = tl.load(dp, mask=m, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    sg = tl.sigmoid(gf)
    s = (gf * sg).to(g.dtype).to(tl.float32)
    du = dy * s                                     # d up, as the product's backward rounds it
    ds = (dy * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    dg = ds * sg * (1.0 + gf * (1.0 - sg))          # SiLU's backward, as torch computes it
    op, _ = _tile(dh_ptr, r, c, R, F, s_or)
    tl.store(op, dg.to(dh_ptr.dtype.element_ty), mask=m)
    tl.store(op + F, du.to(dh_ptr.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dim) with contiguous columns (a copy only where it must)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch(R: int, F: int) -> tuple[dict, tuple]:
    bf = min(_p2(F), MAX_BF)
    br = max(1, TILE // bf)
    return {"BR": br, "BF": bf, "num_warps": 4}, (triton.cdiv(R, br), triton.cdiv(F, bf))


def _forward(h: torch.Tensor) -> torch.Tensor:
    F = h.shape[-1] // 2
    h2 = _rows(h)
    R = h2.shape[0]
    y = torch.empty(*h.shape[:-1], F, device=h.device, dtype=h.dtype)
    if R and F:
        cfg, grid = _launch(R, F)
        _swiglu_fwd_kernel[grid](h2, y, R, F, h2.stride(0), F, **cfg)
    return y


def _backward(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    F = h.shape[-1] // 2
    h2, dy2 = _rows(h), _rows(dy)
    R = h2.shape[0]
    dh = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    if R and F:
        cfg, grid = _launch(R, F)
        _swiglu_bwd_kernel[grid](h2, dy2, dh, R, F, h2.stride(0), dy2.stride(0), 2 * F, **cfg)
    return dh


@torch.library.custom_op("megacpp::swiglu_fwd", mutates_args=(), tags=_FLEXIBLE)
def _swiglu_fwd_op(h: torch.Tensor) -> torch.Tensor:
    with _device_ctx(h):
        return _forward(h)


@_swiglu_fwd_op.register_fake
def _(h):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("megacpp::swiglu_bwd", mutates_args=(), tags=_FLEXIBLE)
def _swiglu_bwd_op(dy: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    with _device_ctx(h):
        return _backward(dy, h)


@_swiglu_bwd_op.register_fake
def _(dy, h):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    (h,) = inputs
    ctx.save_for_backward(h)


def _backward_fn(ctx, dy):
    (h,) = ctx.saved_tensors
    return _swiglu_bwd_op(dy, h)


_swiglu_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


def swiglu_triton(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU in Triton; same argument and result as `reference.swiglu`."""
    _check(h)
    if h.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"swiglu_triton: h is {h.dtype}; float64 goes to the reference")
    return _swiglu_fwd_op(h)
