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
H200, against ~0.1 ms for the forward: K * K live tiles.) The walks (K <= 4,
the default) do the same one row at a time; `_conv_bwd_fused_kernel` (PATH
"fused") is one pass of tiles that recomputes g at each of the K shifts
dx reads, in smaller tiles than that first one pass (see DEFAULT).

Precision against the reference under bf16: the reference rounds the
pre-activation's gradient to bf16 (F.silu's backward on a bf16 tensor) and
so do these kernels; it then rounds each tap's share of dx to bf16 before
adding them, where the kernels round the sum once.

torch.compile: forward and backward are torch.library custom ops with fake
implementations and register_autograd, as in ops/ssd/triton_ssd.py.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .._triton_util import FLEXIBLE_LAYOUT as _FLEXIBLE
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
def _tile(L, CH, BT: tl.constexpr, BC: tl.constexpr):
    """A tile program's (row block, batch row, time steps t, channels c, t < L, c < CH)."""
    pid_t = tl.program_id(0)
    b = tl.program_id(2)
    t = pid_t * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    return pid_t, b, t, c, t < L, c < CH


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
    pid_t, b, t, c, vt, vc = _tile(L, CH, BT, BC)
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
    pid_t, b, t, c, vt, vc = _tile(L, CH, BT, BC)
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


@triton.jit
def _conv_bwd_fused_kernel(
    x_ptr, w_ptr, bias_ptr, doc_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
    L, CH,
    s_xb, s_xl, s_xc, s_db, s_dl, s_gb, s_gl, s_gc, s_ob, s_ol, s_oc,
    K: tl.constexpr, KP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """The backward in one pass over (BT time steps, BC channels) tiles: g at
    the tile's rows with the partial d(weight)/d(bias) sums of those rows (as
    _conv_dpre_kernel), and dx_t = sum_s w[K-1-s] g_{t+s} with g_{t+s}
    recomputed at each shift s from dy and x (as _conv_dx_kernel, whose g
    _conv_dpre_kernel stores): nothing but dx and the partials is written,
    and every load of a program is independent of its stores (the walks
    store a row before loading the next)."""
    pid_t, b, t, c, vt, vc = _tile(L, CH, BT, BC)
    kk = tl.arange(0, KP)
    x_base = x_ptr + b.to(tl.int64) * s_xb
    d_base = doc_ptr + b.to(tl.int64) * s_db
    d_t = _doc_of(d_base, t, vt, s_dl, HAS_DOC)
    g = _dpre(x_ptr, w_ptr, bias_ptr, doc_ptr, dy_ptr, b, t, c, vc, L, s_xb, s_xl, s_xc, s_db, s_dl,
              s_gb, s_gl, s_gc, K, HAS_BIAS, HAS_DOC, SILU, BT, BC)
    dw = tl.zeros((KP, BC), dtype=tl.float32)
    for k in tl.static_range(K):
        ts = t - k
        ok = _in_doc(vt & (ts >= 0), d_base, ts, d_t, s_dl, HAS_DOC)
        xv = tl.load(x_base + ts[:, None] * s_xl + c[None, :] * s_xc, mask=ok[:, None] & vc[None, :], other=0.0)
        dw += tl.where(kk[:, None] == k, tl.sum(g * xv.to(tl.float32), axis=0)[None, :], 0.0)
    dx = g * tl.load(w_ptr + c * K + (K - 1), mask=vc, other=0.0).to(tl.float32)[None, :]
    for s in tl.static_range(1, K):
        ts = t + s
        ok = _in_doc(vt & (ts < L), d_base, ts, d_t, s_dl, HAS_DOC)
        gs = _dpre(x_ptr, w_ptr, bias_ptr, doc_ptr, dy_ptr, b, ts, c, vc, L, s_xb, s_xl, s_xc, s_db, s_dl,
                   s_gb, s_gl, s_gc, K, HAS_BIAS, HAS_DOC, SILU, BT, BC)
        ws = tl.load(w_ptr + c * K + (K - 1 - s), mask=vc, other=0.0).to(tl.float32)
        dx += tl.where(ok[:, None], gs * ws[None, :], 0.0)
    tl.store(dx_ptr + b.to(tl.int64) * s_ob + t[:, None] * s_ol + c[None, :] * s_oc,
             dx.to(dx_ptr.dtype.element_ty), mask=vt[:, None] & vc[None, :])
    part = (b * tl.num_programs(0) + pid_t).to(tl.int64)
    tl.store(dw_ptr + (part * CH + c[None, :]) * K + (K - 1 - kk[:, None]), dw,
             mask=(kk[:, None] < K) & vc[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + part * CH + c, tl.sum(g, axis=0), mask=vc)


# ---------------------------------------------------------------- the walks
# K <= 4 (the models' convs): one program walks its BT time steps one row at a
# time over BC channels, the last K inputs (and their doc ids) carried in
# registers, so x is read once and nothing is reduced across threads. The
# tiles above re-read each input K times per pass and reduce d(weight) over
# the time axis of a 2-D tile, which spilled and ran at ~5x the forward's time.

WALK_MAX_K = 4


@triton.jit
def _row(base, t, c, vc, L, s_l, s_c):
    """Row t (BC,) of a (t, c) tensor at `base`; zeros where t is outside [0, L)."""
    ok = (t >= 0) & (t < L)
    return tl.load(base + t * s_l + c * s_c, mask=vc & ok, other=0.0)


@triton.jit
def _doc1(d_base, t, L, s_dl, HAS_DOC: tl.constexpr):
    """Doc id at time step t (-1 outside [0, L); 0 everywhere when unpacked: the
    taps outside are zero loads then)."""
    d = t * 0
    if HAS_DOC:
        d = tl.load(d_base + t * s_dl, mask=(t >= 0) & (t < L), other=-1)
    return d


@triton.jit
def _wtap(w_ptr, c, vc, K: tl.constexpr, k: tl.constexpr):
    """float32 weight of tap k (x_{t-k}), w[c, K-1-k]; zeros for k >= K."""
    w = tl.zeros(c.shape, dtype=tl.float32)
    if k < K:
        w = tl.load(w_ptr + c * K + (K - 1 - k), mask=vc, other=0.0).to(tl.float32)
    return w


@triton.jit
def _tap(v, w, same):
    """w * v in float32, or 0 where the tap reaches into another document."""
    return tl.where(same, v.to(tl.float32) * w, 0.0)


@triton.jit
def _walk_setup(x_ptr, w_ptr, bias_ptr, doc_ptr, s_xb, s_db, CH,
                K: tl.constexpr, HAS_BIAS: tl.constexpr, BC: tl.constexpr):
    """A walk program's coordinates, row bases, the taps' float32 weights
    (tap k, x_{t-k}, weighs w[c, K-1-k]; taps past K weigh 0) and bias."""
    pid_t = tl.program_id(0)
    b = tl.program_id(2)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    vc = c < CH
    bias = tl.zeros((BC,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=vc, other=0.0).to(tl.float32)
    return (pid_t, b, c, vc, x_ptr + b.to(tl.int64) * s_xb, doc_ptr + b.to(tl.int64) * s_db,
            _wtap(w_ptr, c, vc, K, 0), _wtap(w_ptr, c, vc, K, 1), _wtap(w_ptr, c, vc, K, 2),
            _wtap(w_ptr, c, vc, K, 3), bias)


@triton.jit
def _walk_pre(bias, v0, v1, v2, v3, w0, w1, w2, w3, s1, s2, s3, K: tl.constexpr):
    """float32 pre-activation of one row from its taps v_k = x_{t-k} (s_k: in its document)."""
    pre = bias + v0.to(tl.float32) * w0
    if K > 1:
        pre += _tap(v1, w1, s1)
    if K > 2:
        pre += _tap(v2, w2, s2)
    if K > 3:
        pre += _tap(v3, w3, s3)
    return pre


@triton.jit
def _conv_fwd_walk_kernel(
    x_ptr, w_ptr, bias_ptr, doc_ptr, y_ptr,
    L, CH,
    s_xb, s_xl, s_xc, s_db, s_dl, s_yb, s_yl, s_yc,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """The forward, walking t up: y_t = act(round(bias + sum_k w[K-1-k] x_{t-k}))."""
    pid_t, b, c, vc, x_base, d_base, w0, w1, w2, w3, bias = _walk_setup(
        x_ptr, w_ptr, bias_ptr, doc_ptr, s_xb, s_db, CH, K, HAS_BIAS, BC)
    y_base = y_ptr + b.to(tl.int64) * s_yb
    t0 = pid_t * BT
    # the window before the first row: x_{t0-1..t0-3} and their documents
    x1 = _row(x_base, t0 - 1, c, vc, L, s_xl, s_xc)
    x2 = _row(x_base, t0 - 2, c, vc, L, s_xl, s_xc)
    x3 = _row(x_base, t0 - 3, c, vc, L, s_xl, s_xc)
    d1 = _doc1(d_base, t0 - 1, L, s_dl, HAS_DOC)
    d2 = _doc1(d_base, t0 - 2, L, s_dl, HAS_DOC)
    d3 = _doc1(d_base, t0 - 3, L, s_dl, HAS_DOC)
    for i in tl.static_range(BT):
        t = t0 + i
        x0 = _row(x_base, t, c, vc, L, s_xl, s_xc)
        d0 = _doc1(d_base, t, L, s_dl, HAS_DOC)
        acc = _walk_pre(bias, x0, x1, x2, x3, w0, w1, w2, w3, d1 == d0, d2 == d0, d3 == d0, K)
        y = acc.to(y_ptr.dtype.element_ty)   # the reference's rounding before the activation
        if SILU:
            yf = y.to(tl.float32)
            y = (yf * tl.sigmoid(yf)).to(y_ptr.dtype.element_ty)
        tl.store(y_base + t * s_yl + c * s_yc, y, mask=vc & (t < L))
        x3, x2, x1 = x2, x1, x0
        d3, d2, d1 = d2, d1, d0


@triton.jit
def _conv_bwd_walk_kernel(
    x_ptr, w_ptr, bias_ptr, doc_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
    L, CH,
    s_xb, s_xl, s_xc, s_db, s_dl, s_gb, s_gl, s_gc, s_ob, s_ol, s_oc,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, SILU: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr,
):
    """The whole backward in one walk down t: at each row the pre-activation
    (recomputed from the carried inputs), its gradient g (rounded to dy's
    dtype, as the reference's SiLU backward rounds it), g's share of the
    per-program d(weight)/d(bias) sums, and dx_t = sum_s w[K-1-s] g_{t+s}
    from the last K gradients carried (rounded once). The walk starts K-1
    rows above the block to have the g's its last rows need (those rows add
    nothing to the sums: the program above owns them)."""
    pid_t, b, c, vc, x_base, d_base, w0, w1, w2, w3, bias = _walk_setup(
        x_ptr, w_ptr, bias_ptr, doc_ptr, s_xb, s_db, CH, K, HAS_BIAS, BC)
    g_base = dy_ptr + b.to(tl.int64) * s_gb
    o_base = dx_ptr + b.to(tl.int64) * s_ob
    t_top = pid_t * BT + BT + K - 2
    # inputs x_{t}, x_{t-1}, x_{t-2} of the first row walked (x_{t-K+1} is loaded in the step)
    xa = _row(x_base, t_top, c, vc, L, s_xl, s_xc)
    xb = _row(x_base, t_top - 1, c, vc, L, s_xl, s_xc)
    xc = _row(x_base, t_top - 2, c, vc, L, s_xl, s_xc)
    da = _doc1(d_base, t_top, L, s_dl, HAS_DOC)
    db_ = _doc1(d_base, t_top - 1, L, s_dl, HAS_DOC)
    dc = _doc1(d_base, t_top - 2, L, s_dl, HAS_DOC)
    # gradients g_{t+1..t+3} and their documents (rows past L have g = 0)
    g1 = tl.zeros((BC,), dtype=tl.float32)
    g2 = tl.zeros((BC,), dtype=tl.float32)
    g3 = tl.zeros((BC,), dtype=tl.float32)
    e1 = da * 0 - 1
    e2 = da * 0 - 1
    e3 = da * 0 - 1
    dw0 = tl.zeros((BC,), dtype=tl.float32)
    dw1 = tl.zeros((BC,), dtype=tl.float32)
    dw2 = tl.zeros((BC,), dtype=tl.float32)
    dw3 = tl.zeros((BC,), dtype=tl.float32)
    dbias = tl.zeros((BC,), dtype=tl.float32)
    for j in tl.static_range(BT + K - 1):
        t = t_top - j
        xn = _row(x_base, t - (K - 1), c, vc, L, s_xl, s_xc)
        dn = _doc1(d_base, t - (K - 1), L, s_dl, HAS_DOC)
        # taps of row t: x_{t-k} for k < K is (xa, xb, xc, xn)[:K-1] + [xn]
        if K == 1:
            v1, v2, v3 = xa, xa, xa
            f1, f2, f3 = dn, dn, dn
        elif K == 2:
            v1, v2, v3 = xn, xn, xn
            f1, f2, f3 = dn, dn, dn
        elif K == 3:
            v1, v2, v3 = xb, xn, xn
            f1, f2, f3 = db_, dn, dn
        else:
            v1, v2, v3 = xb, xc, xn
            f1, f2, f3 = db_, dc, dn
        v0 = xa
        if K == 1:
            v0 = xn
        s1 = f1 == da
        s2 = f2 == da
        s3 = f3 == da
        g = _row(g_base, t, c, vc, L, s_gl, s_gc)
        if SILU:
            pre = _walk_pre(bias, v0, v1, v2, v3, w0, w1, w2, w3, s1, s2, s3, K)
            p = pre.to(g.dtype).to(tl.float32)
            sg = tl.sigmoid(p)
            g = (g.to(tl.float32) * sg * (1.0 + p * (1.0 - sg))).to(g.dtype)
        gf = g.to(tl.float32)
        if j >= K - 1:   # rows of this block (the first K-1 walked are the block above's)
            dw0 += gf * v0.to(tl.float32)
            if K > 1:
                dw1 += _tap(v1, gf, s1)
            if K > 2:
                dw2 += _tap(v2, gf, s2)
            if K > 3:
                dw3 += _tap(v3, gf, s3)
            if HAS_BIAS:
                dbias += gf
            dx = gf * w0
            if K > 1:
                dx += tl.where(e1 == da, g1 * w1, 0.0)
            if K > 2:
                dx += tl.where(e2 == da, g2 * w2, 0.0)
            if K > 3:
                dx += tl.where(e3 == da, g3 * w3, 0.0)
            tl.store(o_base + t * s_ol + c * s_oc, dx.to(dx_ptr.dtype.element_ty), mask=vc & (t < L))
        g3, g2, g1 = g2, g1, gf
        e3, e2, e1 = e2, e1, da
        if K == 3:
            xa, xb = xb, xn
            da, db_ = db_, dn
        elif K == 2:
            xa = xn
            da = dn
        elif K > 3:
            xa, xb, xc = xb, xc, xn
            da, db_, dc = db_, dc, dn
    part = (b * tl.num_programs(0) + pid_t).to(tl.int64)
    dw_base = dw_ptr + (part * CH + c) * K
    tl.store(dw_base + (K - 1), dw0, mask=vc)
    if K > 1:
        tl.store(dw_base + (K - 2), dw1, mask=vc)
    if K > 2:
        tl.store(dw_base + (K - 3), dw2, mask=vc)
    if K > 3:
        tl.store(dw_base + (K - 4), dw3, mask=vc)
    if HAS_BIAS:
        tl.store(db_ptr + part * CH + c, dbias, mask=vc)


# Launch parameters per kernel (BT time steps x BC channels a program,
# num_warps, num_stages; dpre also RT, its rows per inner step, BT when
# unset): DEFAULT, then TUNED, then LAUNCH, as in ops/ssd/triton_ssd.py;
# benchmarks/conv_tune.py sweeps them on a GPU. Under the interpreter (CPU
# tests) DEFAULT and LAUNCH (tests set LAUNCH to reach the other paths).
# The walks: one warp a program. The backward's 8 rows x 64 channels came from
# `python3 benchmarks/conv_tune.py` on an H200 (2026-11-28) at mamba2-130m's
# conv (batch 8, 2048 steps, 1792 channels, K 4, bf16): 0.295 ms a call at 32 x
# 128 -> 0.139 (the tiles' two passes: ~0.25); the forward had no better
# launch than 32 x 128 (0.057 ms, the tiles' 0.054).
KERNELS = ("fwd", "dpre", "dx", "fwd_walk", "bwd_walk", "bwd_fused")
_TILE = {"BT": 64, "BC": 128, "num_warps": 4}
# bwd_fused: its K shifted recomputations of g keep ~K tiles live, so the
# tile is a quarter of the two-pass tiles' (an untuned first guess)
DEFAULT = {"fwd": _TILE, "dpre": _TILE, "dx": _TILE, "fwd_walk": {"BT": 32, "BC": 128, "num_warps": 1},
           "bwd_walk": {"BT": 8, "BC": 64, "num_warps": 1}, "bwd_fused": {"BT": 32, "BC": 64, "num_warps": 4}}
TUNED: dict[str, dict] = {k: {} for k in KERNELS}
LAUNCH: dict[str, dict] = {k: {} for k in KERNELS}
# Which kernels run: "walk" (K <= WALK_MAX_K) or "tiles" (any K; the only
# path for longer convs); the backward also "fused" (one pass of tiles, any
# K; not yet measured on a GPU). benchmarks/conv_tune.py --paths times them.
# MEGACPP_CONV_BWD picks the backward's for a process (A/B runs; the run
# record's conv paths say which ran).
PATH = {"fwd": "walk", "bwd": os.environ.get("MEGACPP_CONV_BWD", "walk")}
_PATHS = {"fwd": ("walk", "tiles"), "bwd": ("walk", "tiles", "fused")}
if PATH["bwd"] not in _PATHS["bwd"]:
    raise ValueError(f"MEGACPP_CONV_BWD={PATH['bwd']!r}: 'walk', 'tiles' or 'fused'")


def path(direction: str, K: int) -> str:
    """The kernels the forward ('fwd': 'walk' | 'tiles') or backward ('bwd': also
    'fused') of a width-K conv runs."""
    p = PATH[direction]
    if p not in _PATHS[direction]:
        raise ValueError(f"causal conv PATH[{direction!r}] = {p!r}: "
                         + " or ".join(repr(x) for x in _PATHS[direction]))
    if p == "walk" and K > WALK_MAX_K:
        return "tiles"
    return p


def _launch(name: str, b: int, l: int, ch: int) -> tuple[dict, tuple]:
    """(launch keywords, grid) of kernel `name` for (b, l, ch)."""
    cfg = dict(DEFAULT[name])
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
    walk = path("fwd", K) == "walk"
    cfg, grid = _launch("fwd_walk" if walk else "fwd", b, l, ch)
    y = torch.empty(b, l, ch, device=x.device, dtype=x.dtype)
    kernel = _conv_fwd_walk_kernel if walk else _conv_fwd_kernel
    kernel[grid](
        x, w, bias if bias is not None else w, doc, y, l, ch,
        *x.stride(), *doc.stride(), *y.stride(),
        K=K, HAS_BIAS=bias is not None, HAS_DOC=doc_ids is not None, SILU=silu, **cfg,
    )
    return y


def _backward(dy, x, weight, bias, doc_ids, silu):
    b, l, ch = x.shape
    K, w, doc = _operands(x, weight, doc_ids)
    dy = dy.contiguous()
    kind = path("bwd", K)
    walk = kind == "walk"
    cfg, grid = _launch({"walk": "bwd_walk", "tiles": "dpre", "fused": "bwd_fused"}[kind], b, l, ch)
    parts = b * grid[0]
    dw = torch.empty(parts, ch, K, device=x.device, dtype=torch.float32)
    db = torch.empty(parts, ch, device=x.device, dtype=torch.float32) if bias is not None else dw
    dx = torch.empty(b, l, ch, device=x.device, dtype=x.dtype)
    flags = dict(K=K, HAS_BIAS=bias is not None, HAS_DOC=doc_ids is not None, SILU=silu)
    if walk or kind == "fused":
        kernel = _conv_bwd_walk_kernel if walk else _conv_bwd_fused_kernel
        extra = {} if walk else {"KP": triton.next_power_of_2(K)}
        kernel[grid](
            x, w, bias if bias is not None else w, doc, dy, dx, dw, db, l, ch,
            *x.stride(), *doc.stride(), *dy.stride(), *dx.stride(), **flags, **extra, **cfg,
        )
    else:
        g = torch.empty_like(dy) if silu else dy
        _conv_dpre_kernel[grid](
            x, w, bias if bias is not None else w, doc, dy, g, dw, db, l, ch,
            *x.stride(), *doc.stride(), *dy.stride(), KP=triton.next_power_of_2(K), **flags, **cfg,
        )
        cfg, grid = _launch("dx", b, l, ch)
        _conv_dx_kernel[grid](g, w, doc, dx, l, ch, *g.stride(), *doc.stride(), *dx.stride(),
                              K=K, HAS_DOC=doc_ids is not None, **cfg)
    dw = dw.sum(0).reshape(weight.shape).to(weight.dtype)
    db = db.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dw, db


@torch.library.custom_op("megacpp::causal_conv_fwd", mutates_args=(), tags=_FLEXIBLE)
def _conv_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 doc_ids: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    with _device_ctx(x):
        return _forward(x, weight, bias, doc_ids, silu)


@_conv_fwd_op.register_fake
def _(x, weight, bias, doc_ids, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("megacpp::causal_conv_bwd", mutates_args=(), tags=_FLEXIBLE)
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
