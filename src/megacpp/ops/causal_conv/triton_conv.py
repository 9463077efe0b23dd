"""Triton depthwise causal conv with document masking, forward and backward.

Same signature and result as `reference.causal_conv1d` (without its
`same_doc` memo: the kernels read doc_ids directly):

    causal_conv1d_triton(x, weight, bias=None, doc_ids=None, activation=None) -> y

One program per (block of BT time steps, block of BC channels, row).
Forward: the K taps of each output are read straight from x (a tap is
dropped where t-k < 0 or doc_ids differ), summed in float32 with the bias,
rounded to x's dtype as the reference rounds it, then the SiLU (if any).
Backward, two passes: the pre-activation's gradient g (recomputing the
pre-activation from x, so nothing but the inputs is saved; rounded to x's
dtype as the reference's SiLU backward rounds it) with per-program float32
partial sums of d(weight) and d(bias), added up in torch; then dx from g,
summed in float32 and rounded once. (One pass that recomputed g at the K
outputs each x_t reaches took 2.1 ms a call at mamba2-130m's shape on an
H200, against ~0.1 ms for the forward: K * K live tiles.)

Precision against the reference under bf16: the reference rounds the
pre-activation's gradient to bf16 (F.silu's backward on a bf16 tensor) and
so do these kernels; it then rounds each tap's share of dx to bf16 before
adding them, where the kernels round the sum once.

torch.compile: forward and backward are torch.library custom ops with fake
implementations and register_autograd, as in ops/ssd/triton_ssd.py.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_util import INTERPRET
from .._triton_util import device_ctx as _device_ctx
from .reference import check as _check


@triton.jit
def _doc_of(d_base, t, vt, s_dl, HAS_DOC: tl.constexpr):
    """The doc id at time steps t (-1 outside; 0 when unpacked)."""
    d = tl.zeros_like(t)
    if HAS_DOC:
        d = tl.load(d_base + t * s_dl, mask=vt, other=-1)
    return d


@triton.jit
def _in_doc(ok, d_base, ts, d_t, s_dl, HAS_DOC: tl.constexpr):
    """ok, kept only where time step ts is in the document d_t (when packed)."""
    if HAS_DOC:
        ok = ok & (tl.load(d_base + ts * s_dl, mask=ok, other=-2) == d_t)
    return ok


@triton.jit
def _pre(x_ptr, w_ptr, bias_ptr, doc_ptr, b, t, c, vc, L,
         s_xb, s_xl, s_xc, s_db, s_dl,
         K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr,
         BT: tl.constexpr, BC: tl.constexpr):
    """float32 pre-activation (bias + taps) at time steps t (BT,), channels c (BC,); 0 where t is outside."""
    vt = (t >= 0) & (t < L)
    x_base = x_ptr + b.to(tl.int64) * s_xb
    d_base = doc_ptr + b.to(tl.int64) * s_db
    d_t = _doc_of(d_base, t, vt, s_dl, HAS_DOC)
    acc = tl.zeros((BT, BC), dtype=tl.float32)
    for k in tl.static_range(K):
        ts = t - k
        ok = _in_doc(vt & (ts >= 0), d_base, ts, d_t, s_dl, HAS_DOC)
        xv = tl.load(x_base + ts[:, None] * s_xl + c[None, :] * s_xc, mask=ok[:, None] & vc[None, :], other=0.0)
        wk = tl.load(w_ptr + c * K + (K - 1 - k), mask=vc, other=0.0)
        acc += xv.to(tl.float32) * wk.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + c, mask=vc, other=0.0).to(tl.float32)[None, :]
    return tl.where(vt[:, None], acc, 0.0)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, doc_ptr, y_ptr,
    L, CH,
    s_xb, s_xl, s_xc, s_db, s_dl, s_yb, s_yl, s_yc,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    vc = c < CH
    pre = _pre(x_ptr, w_ptr, bias_ptr, doc_ptr, b, t, c, vc, L, s_xb, s_xl, s_xc, s_db, s_dl,
               K, HAS_BIAS, HAS_DOC, BT, BC)
    y = pre.to(y_ptr.dtype.element_ty)   # the reference's rounding before the activation
    if SILU:
        yf = y.to(tl.float32)
        y = (yf * tl.sigmoid(yf)).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + b.to(tl.int64) * s_yb + t[:, None] * s_yl + c[None, :] * s_yc, y,
             mask=(t < L)[:, None] & vc[None, :])


@triton.jit
def _dpre(x_ptr, w_ptr, bias_ptr, doc_ptr, dy_ptr, b, t, c, vc, L,
          s_xb, s_xl, s_xc, s_db, s_dl, s_gb, s_gl, s_gc,
          K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr,
          BT: tl.constexpr, BC: tl.constexpr):
    """Gradient of the pre-activation at time steps t, in x's dtype's precision (as float32); 0 outside."""
    vt = (t >= 0) & (t < L)
    g = tl.load(dy_ptr + b.to(tl.int64) * s_gb + t[:, None] * s_gl + c[None, :] * s_gc,
                mask=vt[:, None] & vc[None, :], other=0.0)
    if SILU:
        pre = _pre(x_ptr, w_ptr, bias_ptr, doc_ptr, b, t, c, vc, L, s_xb, s_xl, s_xc, s_db, s_dl,
                   K, HAS_BIAS, HAS_DOC, BT, BC)
        p = pre.to(g.dtype).to(tl.float32)
        sg = tl.sigmoid(p)
        g = (g.to(tl.float32) * sg * (1.0 + p * (1.0 - sg))).to(g.dtype)
    return g.to(tl.float32)


@triton.jit
def _conv_dpre_kernel(
    x_ptr, w_ptr, bias_ptr, doc_ptr, dy_ptr, g_ptr, dw_ptr, db_ptr,
    L, CH,
    s_xb, s_xl, s_xc, s_db, s_dl, s_gb, s_gl, s_gc,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, RT: tl.constexpr,
):
    """The pre-activation's gradient g (stored when SILU; else it is dy), and
    per-program partial sums of d(weight)[c, K-1-k] = sum_t g_t x_{t-k} and d(bias).

    A program covers BT time steps RT at a time (RT divides BT): the live
    tiles are RT x BC, the d(weight) sums (KP >= K rows) carry over. RT = BT
    is one pass with the same arithmetic as before the loop; smaller RT
    trades the 2-D tiles' registers (255 and 80 bytes of spills a thread at
    64 x 128 x 4 warps compiled offline for sm_90, 204 and none at RT 32:
    benchmarks/triton_registers.py) for more reductions."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    c = pid_c * BC + tl.arange(0, BC)
    vc = c < CH
    kk = tl.arange(0, KP)
    x_base = x_ptr + b.to(tl.int64) * s_xb
    d_base = doc_ptr + b.to(tl.int64) * s_db
    dw = tl.zeros((KP, BC), dtype=tl.float32)
    db = tl.zeros((BC,), dtype=tl.float32)
    for r0 in tl.static_range(0, BT, RT):
        t = pid_t * BT + r0 + tl.arange(0, RT)
        vt = t < L
        g = _dpre(x_ptr, w_ptr, bias_ptr, doc_ptr, dy_ptr, b, t, c, vc, L, s_xb, s_xl, s_xc, s_db, s_dl,
                  s_gb, s_gl, s_gc, K, HAS_BIAS, HAS_DOC, SILU, RT, BC)
        if SILU:  # g has the same strides as dy (both contiguous (b, t, c))
            tl.store(g_ptr + b.to(tl.int64) * s_gb + t[:, None] * s_gl + c[None, :] * s_gc,
                     g.to(g_ptr.dtype.element_ty), mask=vt[:, None] & vc[None, :])
        d_t = _doc_of(d_base, t, vt, s_dl, HAS_DOC)
        for k in tl.static_range(K):
            ts = t - k
            ok = _in_doc(vt & (ts >= 0), d_base, ts, d_t, s_dl, HAS_DOC)
            xv = tl.load(x_base + ts[:, None] * s_xl + c[None, :] * s_xc, mask=ok[:, None] & vc[None, :],
                         other=0.0)
            dw += tl.where(kk[:, None] == k, tl.sum(g * xv.to(tl.float32), axis=0)[None, :], 0.0)
        if HAS_BIAS:
            db += tl.sum(g, axis=0)
    part = (b * tl.num_programs(0) + pid_t).to(tl.int64)
    tl.store(dw_ptr + (part * CH + c[None, :]) * K + (K - 1 - kk[:, None]), dw,
             mask=(kk[:, None] < K) & vc[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + part * CH + c, db, mask=vc)


@triton.jit
def _conv_dx_kernel(
    g_ptr, w_ptr, doc_ptr, dx_ptr,
    L, CH,
    s_gb, s_gl, s_gc, s_db, s_dl, s_ob, s_ol, s_oc,
    K: tl.constexpr, HAS_DOC: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
):
    """dx_t = sum_s w[K-1-s] g_{t+s}, over the outputs t+s of x_t's document."""
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    c = pid_c * BC + tl.arange(0, BC)
    vt = t < L
    vc = c < CH
    g_base = g_ptr + b.to(tl.int64) * s_gb
    d_base = doc_ptr + b.to(tl.int64) * s_db
    d_t = _doc_of(d_base, t, vt, s_dl, HAS_DOC)
    dx = tl.zeros((BT, BC), dtype=tl.float32)
    for s in tl.static_range(K):
        ts = t + s
        ok = _in_doc(vt & (ts < L), d_base, ts, d_t, s_dl, HAS_DOC)
        gs = tl.load(g_base + ts[:, None] * s_gl + c[None, :] * s_gc, mask=ok[:, None] & vc[None, :], other=0.0)
        ws = tl.load(w_ptr + c * K + (K - 1 - s), mask=vc, other=0.0).to(tl.float32)
        dx += gs.to(tl.float32) * ws[None, :]
    tl.store(dx_ptr + b.to(tl.int64) * s_ob + t[:, None] * s_ol + c[None, :] * s_oc,
             dx.to(dx_ptr.dtype.element_ty), mask=vt[:, None] & vc[None, :])


# Launch parameters per kernel (BT time steps x BC channels a program,
# num_warps, num_stages; dpre also RT, its rows per inner step, BT when
# unset): DEFAULT, then TUNED, then LAUNCH, as in ops/ssd/triton_ssd.py;
# benchmarks/conv_tune.py sweeps them on a GPU. Under the interpreter (CPU
# tests) DEFAULT and LAUNCH (tests set LAUNCH to reach the other paths).
KERNELS = ("fwd", "dpre", "dx")
DEFAULT = {"BT": 64, "BC": 128, "num_warps": 4}
TUNED: dict[str, dict] = {k: {} for k in KERNELS}
LAUNCH: dict[str, dict] = {k: {} for k in KERNELS}


def _launch(name: str, b: int, l: int, ch: int) -> tuple[dict, tuple]:
    """(launch keywords, grid) of kernel `name` for (b, l, ch)."""
    cfg = dict(DEFAULT)
    if not INTERPRET:
        cfg.update(TUNED[name])
    cfg.update(LAUNCH[name])
    if name == "dpre":
        cfg.setdefault("RT", cfg["BT"])
        if cfg["RT"] > cfg["BT"] or cfg["BT"] % cfg["RT"]:
            raise ValueError(f"causal conv dpre launch: RT={cfg['RT']} must divide BT={cfg['BT']}")
    return cfg, (triton.cdiv(l, cfg["BT"]), triton.cdiv(ch, cfg["BC"]), b)


def _operands(x, weight, doc_ids):
    ch, K = x.shape[-1], weight.shape[-1]
    w = weight.reshape(ch, K)
    if not w.is_contiguous():
        w = w.contiguous()
    doc = doc_ids if doc_ids is not None else x.new_empty(1, 1, dtype=torch.int32)
    return K, w, doc


def _forward(x, weight, bias, doc_ids, silu):
    b, l, ch = x.shape
    K, w, doc = _operands(x, weight, doc_ids)
    cfg, grid = _launch("fwd", b, l, ch)
    y = torch.empty(b, l, ch, device=x.device, dtype=x.dtype)
    _conv_fwd_kernel[grid](
        x, w, bias if bias is not None else w, doc, y, l, ch,
        *x.stride(), *doc.stride(), *y.stride(),
        K=K, HAS_BIAS=bias is not None, HAS_DOC=doc_ids is not None, SILU=silu, **cfg,
    )
    return y


def _backward(dy, x, weight, bias, doc_ids, silu):
    b, l, ch = x.shape
    K, w, doc = _operands(x, weight, doc_ids)
    dy = dy.contiguous()
    g = torch.empty_like(dy) if silu else dy
    cfg, grid = _launch("dpre", b, l, ch)
    parts = b * grid[0]
    dw = torch.empty(parts, ch, K, device=x.device, dtype=torch.float32)
    db = torch.empty(parts, ch, device=x.device, dtype=torch.float32) if bias is not None else dw
    _conv_dpre_kernel[grid](
        x, w, bias if bias is not None else w, doc, dy, g, dw, db, l, ch,
        *x.stride(), *doc.stride(), *dy.stride(),
        K=K, KP=triton.next_power_of_2(K), HAS_BIAS=bias is not None, HAS_DOC=doc_ids is not None,
        SILU=silu, **cfg,
    )
    dx = torch.empty(b, l, ch, device=x.device, dtype=x.dtype)
    cfg, grid = _launch("dx", b, l, ch)
    _conv_dx_kernel[grid](g, w, doc, dx, l, ch, *g.stride(), *doc.stride(), *dx.stride(),
                          K=K, HAS_DOC=doc_ids is not None, **cfg)
    dw = dw.sum(0).reshape(weight.shape).to(weight.dtype)
    db = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


@torch.library.custom_op("megacpp::causal_conv_fwd", mutates_args=())
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 doc_ids: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    with _device_ctx(x):
        return _forward(x, weight, bias, doc_ids, silu)


@_conv_fwd_op.register_fake
def _(x, weight, bias, doc_ids, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("megacpp::causal_conv_bwd", mutates_args=())
def _conv_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 doc_ids: Optional[torch.Tensor], silu: bool) -> list[torch.Tensor]:
    with _device_ctx(x):
        dx, dw, db = _backward(dy, x, weight, bias, doc_ids, silu)
    return [dx, dw, db if db is not None else x.new_empty(0)]


@_conv_bwd_op.register_fake
def _(dy, x, weight, bias, doc_ids, silu):
    return [x.new_empty(x.shape), torch.empty_like(weight),
            torch.empty_like(bias) if bias is not None else x.new_empty(0)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, doc_ids, silu = inputs
    ctx.save_for_backward(x, weight, bias, doc_ids)
    ctx.silu = silu
    ctx.has_bias = bias is not None


def _backward_fn(ctx, dy):
    x, weight, bias, doc_ids = ctx.saved_tensors
    dx, dw, db = _conv_bwd_op(dy, x, weight, bias if ctx.has_bias else None, doc_ids, ctx.silu)
    return dx, dw, db if ctx.has_bias else None, None, None


_conv_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


def causal_conv1d_triton(x, weight, bias=None, doc_ids=None, activation=None):
    """reference.causal_conv1d in Triton (see the module doc)."""
    _check(x, weight, bias, doc_ids, activation)
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"causal_conv1d_triton: {name} is {t.dtype}; float64 goes to the reference")
    if x.shape[1] == 0 or x.shape[0] == 0:
        return x.new_empty(x.shape)
    return _conv_fwd_op(x, weight, bias, doc_ids, activation == "silu")
