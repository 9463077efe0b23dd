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
TILE = 4096
# Backward programs per group per streaming multiprocessor.
BWD_PROGRAMS_PER_SM = 4


@triton.jit
def _gnorm_fwd_kernel(
    x_ptr, z_ptr, w_ptr, y_ptr,
    R, G, eps,
    s_xr, s_zr, s_yr,
    NBG: tl.constexpr, BM: tl.constexpr, BG: tl.constexpr,
):
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    r = (pid_r * BM + tl.arange(0, BM)).to(tl.int64)
    c = tl.arange(0, BG)
    vc = c < G
    m = (r < R)[:, None] & vc[None, :]
    col = g * G + c
    x = tl.load(x_ptr + r[:, None] * s_xr + col[None, :], mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + r[:, None] * s_zr + col[None, :], mask=m, other=0.0).to(tl.float32)
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
    tl.store(y_ptr + r[:, None] * s_yr + col[None, :], y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gnorm_bwd_kernel(
    dy_ptr, x_ptr, z_ptr, w_ptr, dx_ptr, dz_ptr, dw_ptr,
    R, G, D, eps,
    s_dyr, s_xr, s_zr, s_dxr, s_dzr,
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
        m = (r < R)[:, None] & vc[None, :]
        x = tl.load(x_ptr + r[:, None] * s_xr + col[None, :], mask=m, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + r[:, None] * s_zr + col[None, :], mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r[:, None] * s_dyr + col[None, :], mask=m, other=0.0).to(tl.float32)
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
        tl.store(dx_ptr + r[:, None] * s_dxr + col[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)
        tl.store(dz_ptr + r[:, None] * s_dzr + col[None, :], dz.to(dz_ptr.dtype.element_ty), mask=m)
    tl.store(dw_ptr + pid.to(tl.int64) * D + col, dw, mask=vc)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, channels) with contiguous channels (a view where strides allow)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] == 1 else t2.contiguous()


# Launch overrides per kernel ("fwd", "bwd"): TILE (elements of a program's
# rows x channels tile) and num_warps. Empty: the defaults of _block.
# benchmarks/gated_norm_bench.py --sweep times the alternatives.
LAUNCH: dict[str, dict] = {"fwd": {}, "bwd": {}}


def _block(g: int, kernel: str) -> tuple[int, int, int]:
    """(BG, BM, num_warps) of kernel "fwd" or "bwd" for a group of g channels:
    the group's power of two, as many rows as fill the tile (at most 64), and
    a warp per 256 elements (4 to 16): offline for sm_90 the backward at one
    group of 4096 needs 177 registers a thread with 8 warps, 109 with 16."""
    cfg = LAUNCH[kernel]
    bg = _p2(g)
    bm = max(1, min(64, int(cfg.get("TILE", TILE)) // bg))
    return bg, bm, int(cfg.get("num_warps", max(4, min(16, bm * bg // 256))))


def _bwd_programs(device: torch.device, row_blocks: int, groups: int) -> int:
    if INTERPRET or device.type != "cuda":
        return max(1, min(row_blocks, 3))  # a few programs: the strided walk is exercised
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(row_blocks, BWD_PROGRAMS_PER_SM * sms // groups))


def _forward(x, z, weight, eps, group_size, norm_before_gate):
    d = x.shape[-1]
    x2, z2 = _rows(x), _rows(z)
    R = x2.shape[0]
    y = torch.empty(R, d, device=x.device, dtype=x.dtype)
    bg, bm, nw = _block(group_size, "fwd")
    if R:
        _gnorm_fwd_kernel[(triton.cdiv(R, bm), d // group_size)](
            x2, z2, weight, y, R, group_size, float(eps),
            x2.stride(0), z2.stride(0), y.stride(0),
            NBG=bool(norm_before_gate), BM=bm, BG=bg, num_warps=nw,
        )
    return y.view(x.shape)


def _backward(dy, x, z, weight, eps, group_size, norm_before_gate):
    d = x.shape[-1]
    x2, z2, dy2 = _rows(x), _rows(z), _rows(dy)
    R = x2.shape[0]
    ngroups = d // group_size
    dx = torch.empty(R, d, device=x.device, dtype=x.dtype)
    dz = torch.empty(R, d, device=z.device, dtype=z.dtype)
    bg, bm, nw = _block(group_size, "bwd")
    nprog = _bwd_programs(x.device, triton.cdiv(R, bm), ngroups) if R else 1
    dw_part = torch.zeros(nprog, d, device=x.device, dtype=torch.float32)
    if R:
        _gnorm_bwd_kernel[(nprog, ngroups)](
            dy2, x2, z2, weight, dx, dz, dw_part,
            R, group_size, d, float(eps),
            dy2.stride(0), x2.stride(0), z2.stride(0), dx.stride(0), dz.stride(0),
            NBG=bool(norm_before_gate), BM=bm, BG=bg, num_warps=nw,
        )
    return dx.view(x.shape), dz.view(z.shape), dw_part.sum(0).to(weight.dtype)


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
