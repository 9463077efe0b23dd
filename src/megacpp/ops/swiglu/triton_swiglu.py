"""Triton SwiGLU, forward and backward, one pass each over [gate | up].

Same signature and result as `reference.swiglu`:

    swiglu_triton(h, scale=None) -> silu(h[..., :f]) * h[..., f:] [* scale[..., None]]

Importing this module imports triton; `megacpp.ops.swiglu` only does so on
first access of `swiglu_triton` (CI has no GPU).

  _swiglu_fwd_kernel  one program per (block of rows, block of f columns):
                      loads gate and up once, writes y.
  _swiglu_bwd_kernel  the same tiling: loads gate, up and dy once, writes
                      d gate and d up (nothing but h is saved); with a row
                      scale also each program's share of d(scale) (the row
                      sums of dy times the unscaled product, added up in
                      torch where a row spans several column blocks).

Rounding follows the reference's ops in h's dtype: silu(gate) is rounded
before the product; d up = dy * silu(gate) and dy * up are rounded before
SiLU's backward, whose result is rounded once. The arithmetic is float32
(torch's own opmath), so under bf16 the kernels and the reference agree to
the last bit except where a float32 sigmoid differs by an ulp before a
rounding. A row scale (reference.swiglu) multiplies the rounded product in
float32 and is rounded once; d(y) * scale is rounded to h's dtype before
the product's backward, as autograd rounds it through the reference's cast.

torch.compile: forward and backward are torch.library.custom_ops (one opaque
node each) with register_fake and register_autograd, as the other kernels
here are.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_util import FLEXIBLE_LAYOUT as _FLEXIBLE
from .._triton_util import device_ctx as _device_ctx
from .._triton_util import p2 as _p2
from .reference import check as _check
from .reference import check_scale as _check_scale

# Elements of one program's (rows x columns) tile, and the widest column block.
TILE = 4096
MAX_BF = 1024


@triton.jit
def _tile(base, r, c, R, F, s_r):
    """Pointers and mask of rows r x columns c of a (R, *) tensor whose columns are contiguous."""
    return base + r.to(tl.int64)[:, None] * s_r + c[None, :], (r < R)[:, None] & (c < F)[None, :]


@triton.jit
def _swiglu_fwd_kernel(h_ptr, scale_ptr, y_ptr, R, F, s_hr, s_yr,
                       HAS_SCALE: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    hp, m = _tile(h_ptr, r, c, R, F, s_hr)
    g = tl.load(hp, mask=m, other=0.0)
    u = tl.load(hp + F, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf * tl.sigmoid(gf)).to(g.dtype)            # F.silu's result in h's dtype
    y = s.to(tl.float32) * u.to(tl.float32)
    if HAS_SCALE:
        sc = tl.load(scale_ptr + r, mask=r < R, other=0.0).to(tl.float32)
        y = y.to(g.dtype).to(tl.float32) * sc[:, None]   # the product rounded, then scaled
    yp, _ = _tile(y_ptr, r, c, R, F, s_yr)
    tl.store(yp, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, scale_ptr, dy_ptr, dh_ptr, dscale_ptr, R, F, s_hr, s_dr, s_or,
                       HAS_SCALE: tl.constexpr, BR: tl.constexpr, BF: tl.constexpr):
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
    if HAS_SCALE:
        p = (s * u.to(tl.float32)).to(g.dtype).to(tl.float32)     # the unscaled product, rounded
        part = tl.sum(tl.where(m, dy * p, 0.0), axis=1)
        tl.store(dscale_ptr + r.to(tl.int64) * tl.num_programs(1) + tl.program_id(1), part, mask=r < R)
        sc = tl.load(scale_ptr + r, mask=r < R, other=0.0).to(tl.float32)
        dy = (dy * sc[:, None]).to(g.dtype).to(tl.float32)       # d(product), in h's dtype
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


def _forward(h: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    F = h.shape[-1] // 2
    h2 = _rows(h)
    R = h2.shape[0]
    y = torch.empty(*h.shape[:-1], F, device=h.device, dtype=h.dtype)
    if R and F:
        cfg, grid = _launch(R, F)
        sc = scale.reshape(-1).contiguous() if scale is not None else h2
        _swiglu_fwd_kernel[grid](h2, sc, y, R, F, h2.stride(0), F, HAS_SCALE=scale is not None, **cfg)
    return y


def _backward(dy: torch.Tensor, h: torch.Tensor, scale: torch.Tensor | None):
    """(dh, d(scale) in scale's shape and dtype, or None without a scale)."""
    F = h.shape[-1] // 2
    h2, dy2 = _rows(h), _rows(dy)
    R = h2.shape[0]
    dh = torch.empty(h.shape, device=h.device, dtype=h.dtype)
    part = None   # d(scale): one float32 partial sum a row and column block
    if R and F:
        cfg, grid = _launch(R, F)
        sc = scale.reshape(-1).contiguous() if scale is not None else h2
        if scale is not None:
            part = torch.empty(R, grid[1], device=h.device, dtype=torch.float32)
        _swiglu_bwd_kernel[grid](h2, sc, dy2, dh, part if part is not None else h2, R, F, h2.stride(0),
                                 dy2.stride(0), 2 * F, HAS_SCALE=scale is not None, **cfg)
    if scale is None:
        return dh, None
    dscale = part.sum(1) if part is not None else torch.zeros(R, device=h.device)
    return dh, dscale.view(scale.shape).to(scale.dtype)


@torch.library.custom_op("megacpp::swiglu_fwd", mutates_args=(), tags=_FLEXIBLE)
def _swiglu_fwd_op(h: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
    with _device_ctx(h):
        return _forward(h, scale)


@_swiglu_fwd_op.register_fake
def _(h, scale):
    return h.new_empty(*h.shape[:-1], h.shape[-1] // 2)


@torch.library.custom_op("megacpp::swiglu_bwd", mutates_args=(), tags=_FLEXIBLE)
def _swiglu_bwd_op(dy: torch.Tensor, h: torch.Tensor, scale: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """[dh, d(scale)] (without a scale an empty placeholder: custom-op outputs may not be None)."""
    with _device_ctx(h):
        dh, dscale = _backward(dy, h, scale)
    return [dh, dscale if dscale is not None else h.new_empty(0)]


@_swiglu_bwd_op.register_fake
def _(dy, h, scale):
    return [torch.empty_like(h, memory_format=torch.contiguous_format),
            torch.empty_like(scale, memory_format=torch.contiguous_format) if scale is not None else h.new_empty(0)]


def _setup_context(ctx, inputs, output):
    h, scale = inputs
    ctx.save_for_backward(h, scale)
    ctx.has_scale = scale is not None


def _backward_fn(ctx, dy):
    h, scale = ctx.saved_tensors
    dh, dscale = _swiglu_bwd_op(dy, h, scale if ctx.has_scale else None)
    return dh, (dscale if ctx.has_scale else None)


_swiglu_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


def swiglu_triton(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU in Triton; same arguments and result as `reference.swiglu`."""
    _check(h)
    _check_scale(h, scale)
    for name, t in (("h", h), ("scale", scale)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"swiglu_triton: {name} is {t.dtype}; float64 goes to the reference")
    return _swiglu_fwd_op(h, scale)
