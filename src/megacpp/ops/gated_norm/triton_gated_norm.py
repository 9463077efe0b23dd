"""Triton gated RMSNorm, forward and backward, each one pass over its rows.

Same signature and result as `reference.gated_rms_norm`:

    gated_rms_norm_triton(x, z, weight, eps, group_size=None, norm_before_gate=False) -> y like x

Importing this module imports triton; `megacpp.ops.gated_norm` only does so
on first access of `gated_rms_norm_triton` (CI has no GPU).

Why: under torch.compile inductor splits this norm's backward into a
per-row reduction and a column reduction for d(weight) that reads x, z and
dy a second time; the forward and backward together took 4.6 ms of the
all-Mamba-2 step on an H200 (ninth session, BENCHMARKS.md). Here:

  _gnorm_fwd_kernel   one program per (block of rows, group): loads x and z
                      once, the group's mean of squares in float32, writes y.
  _gnorm_bwd_kernel   a fixed number of programs per group, each walking a
                      strided set of row blocks: recomputes the statistics
                      (nothing but the inputs is saved), writes dx and dz,
                      and keeps its d(weight) partial sum in registers; torch
                      adds the (programs x channels) partials.

The group (group_size channels, a power of two or not) lives in registers,
so group_size is limited to MAX_GROUP. Rows may have any stride (z is a
column slice of the in_proj output); the channels must be contiguous.

torch.compile: forward and backward are torch.library.custom_ops (one opaque
node each) with register_fake and register_autograd, as the SSD and conv
kernels are.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_util import FLEXIBLE_LAYOUT as _FLEXIBLE
from .._triton_util import INTERPRET
from .._triton_util import device_ctx as _device_ctx
from .._triton_util import p2 as _p2
from .dispatch import MAX_GROUP
from .reference import check as _check

# Elements of one program's (rows x channels) tile; rows = TILE // p2(group).
# 8192 with a warp per 1024 elements: the H200 sweep's fastest at Gated
# DeltaNet's heads of 128 (0.575 ms forward + backward against 0.770 with
# 4096 and a warp per 256; benchmarks/gated_norm_bench.py --sweep, 2026-11-28).
TILE = 8192
ELEMS_PER_WARP = 1024
# Backward programs per group per streaming multiprocessor.
BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _at(ptr, o, i, s_o, s_i, col):
    """Pointers of rows (o, i) x channels col of a tensor viewed as (outer, RH, D)."""
    return ptr + (o * s_o + i * s_i)[:, None] + col[None, :]


@triton.jit
def _gnorm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr,
    R, RH, G, eps,
    s_xo, s_xi, s_zo, s_zi, s_yo, s_yi,
    NBG: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    r = (pid_r * BM + tl.arange(0, BM)).to(tl.int64)
    o = r // RH
    i = r - o * RH
    c = tl.arange(0, BG)
    vc = c < G
    m = (r < R)[:, None] & vc[None, :]
    col = g * G + c
    x = tl.load(_at(x_ptr, o, i, s_xo, s_xi, col), mask=m, other=0.0).to(tl.float32)
    z = tl.load(_at(z_ptr, o, i, s_zo, s_zi, col), mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=vc, other=0.0).to(tl.float32)
    silu = z * tl.sigmoid(z)
    if NBG:
        s = x
    else:
        s = x * silu
    rstd = tl.rsqrt(tl.sum(s * s, axis=1) / G + eps)
    y = s * rstd[:, None] * w[None, :]
    if NBG:
        y = y * silu
    tl.store(_at(y_ptr, o, i, s_yo, s_yi, col), y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gnorm_bwd_kernel(
    dy_ptr, x_ptr, z_ptr, w_ptr, dx_ptr, dz_ptr, dw_ptr,
    R, RH, G, D, eps,
    s_dyo, s_dyi, s_xo, s_xi, s_zo, s_zi, s_dxo, s_dxi, s_dzo, s_dzi,
    NBG: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    nprog = tl.num_programs(0)
    c = tl.arange(0, BG)
    vc = c < G
    col = g * G + c
    w = tl.load(w_ptr + col, mask=vc, other=0.0).to(tl.float32)
    dw = tl.zeros((BG,), dtype=tl.float32)
    for rb in range(pid, tl.cdiv(R, BM), nprog):
        r = (rb * BM + tl.arange(0, BM)).to(tl.int64)
        o = r // RH
        i = r - o * RH
        m = (r < R)[:, None] & vc[None, :]
        x = tl.load(_at(x_ptr, o, i, s_xo, s_xi, col), mask=m, other=0.0).to(tl.float32)
        z = tl.load(_at(z_ptr, o, i, s_zo, s_zi, col), mask=m, other=0.0).to(tl.float32)
        dy = tl.load(_at(dy_ptr, o, i, s_dyo, s_dyi, col), mask=m, other=0.0).to(tl.float32)
        sig = tl.sigmoid(z)
        silu = z * sig
        dsilu = sig * (1.0 + z * (1.0 - sig))
        if NBG:
            s = x
        else:
            s = x * silu
        rstd = tl.rsqrt(tl.sum(s * s, axis=1) / G + eps)
        n = s * rstd[:, None]
        if NBG:
            # y = n w silu(z)
            gy = dy * w[None, :] * silu
            dz = dy * n * w[None, :] * dsilu
            dw += tl.sum(dy * n * silu, axis=0)
        else:
            # y = n w, n = norm(x silu(z))
            gy = dy * w[None, :]
            dw += tl.sum(dy * n, axis=0)
        ds = rstd[:, None] * (gy - n * (tl.sum(gy * n, axis=1) / G)[:, None])
        if NBG:
            dx = ds
        else:
            dx = ds * silu
            dz = ds * x * dsilu
        tl.store(_at(dx_ptr, o, i, s_dxo, s_dxi, col), dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(_at(dz_ptr, o, i, s_dzo, s_dzi, col), dz.to(dz_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid.to(tl.int64) * D + col, dw, mask=vc)


def _inner(t: torch.Tensor) -> int:
    """RH: rows are addressed as (outer, RH) pairs, RH = the size of t's
    next-to-last dimension, so a (b, t, heads, dv) slice of a wider projection
    (Gated DeltaNet's gate) needs no copy where (b * t * heads) rows would."""
    return t.shape[-2] if t.dim() >= 3 else 1


def _rows(t: torch.Tensor, rh: int) -> tuple[torch.Tensor, int, int]:
    """(t as (outer, rh, channels) with contiguous channels, outer stride, inner
    stride): a view where t's strides allow, else a contiguous copy."""
    t3 = t.reshape(-1, rh, t.shape[-1])
    if t3.stride(-1) != 1 and t3.shape[-1] > 1:
        t3 = t3.contiguous()
    return t3, t3.stride(0), t3.stride(1)


# Launch overrides per kernel ("fwd", "bwd"): TILE (elements of a program's
# rows x channels tile) and num_warps. Empty: the defaults of _block.
# benchmarks/gated_norm_bench.py --sweep times the alternatives.
LAUNCH: dict[str, dict] = {"fwd": {}, "bwd": {}}


def _block(g: int, kernel: str) -> tuple[int, int, int]:
    """(BG, BM, num_warps) of kernel "fwd" or "bwd" for a group of g channels:
    the group's power of two, as many rows as fill the tile (at most 64), and
    a warp per ELEMS_PER_WARP elements, and at least a warp per 256 channels
    of the group (4 to 16 warps). Groups of 2048 channels and more (reached
    only with MEGACPP_GATED_NORM=triton: dispatch.WIDE_GROUP) take one row a
    tile unless LAUNCH sets TILE: offline for sm_90 the backward at 4096
    channels spilled with two rows (72 bytes at 8 warps, 96 at 16) and holds
    one row in 109 registers at 16 warps; test_triton_registers checks it."""
    cfg = LAUNCH[kernel]
    bg = _p2(g)
    if "TILE" not in cfg and bg >= 2048:
        bm = 1
    else:
        bm = max(1, min(64, int(cfg.get("TILE", TILE)) // bg))
    warps = max(4, min(16, max(bm * bg // ELEMS_PER_WARP, bg // 256)))
    return bg, bm, int(cfg.get("num_warps", warps))


def _bwd_programs(device: torch.device, row_blocks: int, groups: int) -> int:
    if INTERPRET or device.type != "cuda":
        return max(1, min(row_blocks, 3))  # a few programs: the strided walk is exercised
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_blocks, BWD_PROGRAMS_PER_SM * sms // groups))


def _forward(x, z, weight, eps, group_size, norm_before_gate):
    d, rh = x.shape[-1], _inner(x)
    (x3, *sx), (z3, *sz) = _rows(x, rh), _rows(z, rh)
    R = x3.shape[0] * rh
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    bg, bm, nw = _block(group_size, "fwd")
    if R:
        _gnorm_fwd_kernel[(triton.cdiv(R, bm), d // group_size)](
            x3, z3, weight, y, R, rh, group_size, float(eps),
            *sx, *sz, rh * d, d,
            NBG=bool(norm_before_gate), BM=bm, BG=bg, num_warps=nw,
        )
    return y


def _backward(dy, x, z, weight, eps, group_size, norm_before_gate):
    d, rh = x.shape[-1], _inner(x)
    (x3, *sx), (z3, *sz), (dy3, *sdy) = _rows(x, rh), _rows(z, rh), _rows(dy, rh)
    R = x3.shape[0] * rh
    ngroups = d // group_size
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    bg, bm, nw = _block(group_size, "bwd")
    nprog = _bwd_programs(x.device, triton.cdiv(R, bm), ngroups) if R else 1
    dw_part = torch.zeros(nprog, d, device=x.device, dtype=torch.float32)
    if R:
        _gnorm_bwd_kernel[(nprog, ngroups)](
            dy3, x3, z3, weight, dx, dz, dw_part,
            R, rh, group_size, d, float(eps),
            *sdy, *sx, *sz, rh * d, d, rh * d, d,
            NBG=bool(norm_before_gate), BM=bm, BG=bg, num_warps=nw,
        )
    return dx, dz, dw_part.sum(0).to(weight.dtype)


@torch.library.custom_op("megacpp::gated_norm_fwd", mutates_args=(), tags=_FLEXIBLE)
def _gnorm_fwd_op(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int,
                  norm_before_gate: bool) -> torch.Tensor:
    with _device_ctx(x):
        return _forward(x, z, weight, eps, group_size, norm_before_gate)


@_gnorm_fwd_op.register_fake
def _(x, z, weight, eps, group_size, norm_before_gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("megacpp::gated_norm_bwd", mutates_args=(), tags=_FLEXIBLE)
def _gnorm_bwd_op(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                  group_size: int, norm_before_gate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _device_ctx(x):
        return _backward(dy, x, z, weight, eps, group_size, norm_before_gate)


@_gnorm_bwd_op.register_fake
def _(dy, x, z, weight, eps, group_size, norm_before_gate):
    cf = torch.contiguous_format
    return torch.empty_like(x, memory_format=cf), torch.empty_like(z, memory_format=cf), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, z, weight, eps, group_size, norm_before_gate = inputs
    ctx.save_for_backward(x, z, weight)
    ctx.args = (eps, group_size, norm_before_gate)


def _backward_fn(ctx, dy):
    x, z, weight = ctx.saved_tensors
    dx, dz, dw = _gnorm_bwd_op(dy, x, z, weight, *ctx.args)
    return dx, dz, dw, None, None, None


_gnorm_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


def gated_rms_norm_triton(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float,
                          group_size: int | None = None, norm_before_gate: bool = False) -> torch.Tensor:
    """Gated RMSNorm in Triton; same arguments and result as `reference.gated_rms_norm`."""
    g = _check(x, z, weight, group_size)
    for name, t in (("x", x), ("z", z), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"gated_rms_norm_triton: {name} is {t.dtype}; float64 goes to the reference")
    if g > MAX_GROUP:
        raise ValueError(f"gated_rms_norm_triton: group_size {g} > {MAX_GROUP} (a group is held in registers)")
    return _gnorm_fwd_op(x, z, weight, float(eps), int(g), bool(norm_before_gate))
