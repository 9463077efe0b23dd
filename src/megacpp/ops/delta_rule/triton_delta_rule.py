r"""Triton chunked gated delta rule (Gated DeltaNet), forward and backward.

Same signature and semantics as `reference.gated_delta_rule`:

    gated_delta_rule_triton(q, k, v, g, beta, initial_state=None, chunk_size=64, scale=None)
        -> (o (batch, seqlen, heads, dv) in q's dtype, final_state (batch, heads, dk, dv) in q's dtype)

Importing this module imports triton; `megacpp.ops.delta_rule` only does so
on first access of `gated_delta_rule_triton` (CI has neither triton nor a GPU).

The algorithm is the chunked WY form derived in reference.py. Per chunk of C
steps (per batch and head), with gamma the within-chunk cumulative sum of g,
e = exp(gamma), r_j = exp(gamma_C - gamma_j), Gam_ij = exp(gamma_i - gamma_j)
for j <= i (else 0) and S the state entering the chunk:

    A   = strict_tril(diag(beta) (K K^T o Gam)),   T = (I + A)^-1
    U   = T diag(beta) V,    Wk = T diag(beta e) K
    W   = U - Wk S                                   ("v_new")
    O   = scale (diag(e) Q S + (causal(Q K^T o Gam)) W)
    S'  = e_C S + (diag(r) K)^T W

What runs where:

  torch (O(batch * seqlen * heads) glue, no factor of C or dk):
    - g padded to whole chunks and its within-chunk cumulative sum gamma,
      kept in float64 (b*h, Lp). Every decay in the kernels is
      exp(float32(gamma_i - gamma_j)) with the difference taken in float64:
      the model's document resets put g = -1e4 into a chunk, and a float32
      cumsum would then lose ~1e-3 absolute in every later difference (the
      reference's segsum sums the segments directly for the same reason).
      beta padded to whole chunks (float32).
    - backward: d(g) as the reverse within-chunk cumulative sum (float64) of
      d(gamma), which the kernels produce; d(gamma) partials summed.

  Triton (everything O(seqlen * C * d) or O(seqlen * dk * dv)):
    _wy_fwd_kernel      per chunk: K K^T, A, T = (I + A)^-1 in float32 (the
                        16 x 16 diagonal blocks by forward substitution, all
                        at once, then block substitution with 16 x 16 dots;
                        or, SOLVE = "rows", C - 1 row steps on the whole
                        tile), through a global scratch slot (L1/L2-resident),
                        U = T diag(beta) V and Wk = T diag(beta e) K.
    _state_fwd_kernel   the sequential scan across chunks, state (dk x BV
                        block of dv) in registers: writes the state entering
                        every chunk, W = U - Wk S, and the final state.
    _out_fwd_kernel     O from Q S and the causal Q K^T o Gam block, one
                        program per chunk (Q K^T once, then the dv blocks),
                        fully parallel.
    _dw_local_kernel    backward: (causal(Q K^T o Gam))^T dO, the part of dW
                        that does not depend on later chunks.
    _state_bwd_kernel   backward reverse scan across chunks: the gradient of
                        the state leaving every chunk, the full dW, and
                        d(initial_state).
    _dqk_kernel         backward per (chunk, dk block): dq (complete), the
                        O- and S'-parts of dk, d(Wk) = -dW S^T and their
                        d(gamma) terms.
    _wy_bwd_kernel      backward per chunk: through the WY step: dv, dbeta,
                        the rest of dk and d(gamma) (dT, dA = -T^T dT T^T).

  Memory: by default nothing but the inputs is saved for backward, which
  reruns _wy_fwd_kernel (T, U, Wk) and _state_fwd_kernel (the per-chunk
  states and W): the per-chunk states are b*h*(l/C)*dk*dv float32 (~200 MB
  for one nam-125m layer). keep_states=True (policy.kernels.delta_states =
  "keep") saves T, Wk, the states and W from the forward instead (~0.45 GB
  a nam-125m layer) and skips both reruns.
  Transient float32 buffers: T (l*C per b, h; A's scratch in the forward),
  U, Wk, W, the per-chunk states and their gradients.

Precision: all accumulation is float32; T is solved in float32. Matmul
operands are cast to q's dtype when q is bf16/fp16 (tensor cores) and stay
float32 with input_precision="ieee" when q is float32 (so fp32 inputs get
fp32 results, not TF32). float64 inputs are refused: the reference is the
float64 oracle. Under TRITON_INTERPRET=1 (CPU tests) bf16 matmul operands
are kept in float32 because the interpreter cannot multiply bf16
(triton-lang/triton#11584); fp16 is exercised for real there. (The
interpreter also truncates float32 -> bf16 stores instead of rounding to
nearest, so its bf16 outputs carry ~2x the GPU's rounding error.)

Launch configuration: `_CONFIG` below, one entry per kernel for half and
float32 inputs, chosen by compiling every launch for sm_90 on the CPU
(tests/ops/test_delta_rule_triton.py::test_kernels_compile_for_sm90 does
the same compile) and keeping configurations without register spills that
fit in shared memory; not yet timed on a GPU. A launch that still runs out
of shared memory is retried with num_stages=1.

Limits: chunk_size <= 128 (C x C tiles live in registers), dk <= 256 (the
scans keep a dk x BV state block in registers). The model uses C = 64,
dk = dv = 128.

torch.compile: forward and backward are torch.library.custom_ops with
register_fake and register_autograd (one opaque node each), as for the
Triton SSD (ops/ssd/triton_ssd.py).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from .._triton_util import INTERPRET
from .._triton_util import blk as _blk
from .._triton_util import device_ctx as _device_ctx
from .._triton_util import dot_dtype as _dot_dtype
from .._triton_util import mm as _mm
from .dispatch import MAX_CHUNK, MAX_DK
from .reference import _check
from .reference import gated_delta_rule as _gdr_reference

# --------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------

@triton.jit
def _decay(gam_i, gam_j, mask):
    """exp(gamma_i - gamma_j) where mask, else 0; the difference in float64."""
    d = (gam_i[:, None] - gam_j[None, :]).to(tl.float32)
    return tl.exp(tl.where(mask, d, float("-inf")))


@triton.jit
def _solve_rows(t_base, A, i, inq, Q):
    """T = (I + A)^-1 for A strictly lower (BC x BC, float32) by forward
    substitution: row r of T is e_r - A[r, :] T (only rows < r, already
    final, contribute): Q - 1 steps on the whole tile. A goes through the
    chunk's scratch slot at t_base (Q x Q) so that row r can be loaded as a
    vector; T is kept transposed so each step reduces along axis 1."""
    tl.store(t_base + i[:, None] * Q + i[None, :], A, mask=inq[:, None] & inq[None, :])
    tl.debug_barrier()
    Tt = (i[:, None] == i[None, :]).to(tl.float32)  # T^T
    for rr in range(1, Q):
        a_r = tl.load(t_base + rr * Q + i, mask=i < rr, other=0.0)
        new = tl.sum(Tt * a_r[None, :], axis=1)
        Tt = tl.where(i[None, :] == rr, Tt - new[:, None], Tt)
    return tl.trans(Tt)


@triton.jit
def _solve_blocks(t_base, A, i, inq, Q, BC: tl.constexpr):
    """T = (I + A)^-1 for A strictly lower (BC x BC, float32), by 16 x 16 blocks:
    the NB = BC / 16 diagonal blocks T_RR = (I + A_RR)^-1 together, by forward
    substitution on an (NB, 16, 16) tile (15 steps, a quarter of the rows
    each), then block forward substitution
        T_RS = -T_RR sum_{S <= M < R} A_RM T_MS      (R > S)
    with float32 (IEEE) 16 x 16 dots. The scratch slot at t_base (Q x Q)
    holds A transposed in its strict upper triangle and T in its lower one,
    so the two never overlap; blocks past Q are masked (their T is unused)."""
    NB: tl.constexpr = BC // 16
    tl.store(t_base + i[:, None] * Q + i[None, :], tl.trans(A), mask=inq[:, None] & inq[None, :])
    tl.debug_barrier()
    l16 = tl.arange(0, 16)
    rb = tl.arange(0, NB)
    # diagonal blocks: Ts[R] = T_RR, row r = e_r - A_RR[r, :] T_RR
    Ts = (l16[None, :, None] == l16[None, None, :]).to(tl.float32) + tl.zeros((NB, 16, 16), dtype=tl.float32)
    col = 16 * rb[:, None] + l16[None, :]                      # (NB, 16) global column of A
    for r in range(1, 16):
        row_g = 16 * rb[:, None] + r                           # (NB, 1) global row of A
        w = tl.load(t_base + col * Q + row_g, mask=(l16[None, :] < r) & (row_g < Q) & (col < Q), other=0.0)
        new = tl.sum(Ts * w[:, :, None], axis=1)
        Ts = tl.where(l16[None, :, None] == r, Ts - new[:, None, :], Ts)
    d_row = 16 * rb[:, None, None] + l16[None, :, None]
    d_col = 16 * rb[:, None, None] + l16[None, None, :]
    tl.store(t_base + d_row * Q + d_col, Ts,
             mask=(l16[None, None, :] <= l16[None, :, None]) & (d_row < Q) & (d_col < Q))
    tl.debug_barrier()
    # off-diagonal blocks, one block row at a time (row R reads rows < R only)
    for R in tl.static_range(1, NB):
        iR = 16 * R + l16
        vR = iR < Q
        t_rr = tl.load(t_base + iR[:, None] * Q + iR[None, :],
                       mask=vR[:, None] & vR[None, :] & (l16[None, :] <= l16[:, None]), other=0.0)
        for S in tl.static_range(0, R):
            iS = 16 * S + l16
            vS = iS < Q
            acc = tl.zeros((16, 16), dtype=tl.float32)
            for M in tl.static_range(S, R):
                iM = 16 * M + l16
                vM = iM < Q
                a_rm = tl.load(t_base + iM[None, :] * Q + iR[:, None], mask=vR[:, None] & vM[None, :], other=0.0)
                if M == S:  # a diagonal block: its strict upper part is A's
                    t_ms = tl.load(t_base + iM[:, None] * Q + iS[None, :],
                                   mask=vM[:, None] & vS[None, :] & (l16[None, :] <= l16[:, None]), other=0.0)
                else:
                    t_ms = tl.load(t_base + iM[:, None] * Q + iS[None, :], mask=vM[:, None] & vS[None, :],
                                   other=0.0)
                acc += tl.dot(a_rm, t_ms, input_precision="ieee")
            tl.store(t_base + iR[:, None] * Q + iS[None, :], -tl.dot(t_rr, acc, input_precision="ieee"),
                     mask=vR[:, None] & vS[None, :])
        tl.debug_barrier()
    m_lower = inq[:, None] & inq[None, :] & (i[:, None] >= i[None, :])
    return tl.load(t_base + i[:, None] * Q + i[None, :], mask=m_lower, other=0.0)


@triton.jit
def _wy_fwd_kernel(
    k_ptr, v_ptr, gam_ptr, beta_ptr, T_ptr, U_ptr, Wk_ptr,
    L, Q, NC, H, DK, DV,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    STORE_T: tl.constexpr, SOLVE_BLOCKS: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    b = bh // H
    LP = NC * Q
    row = bh.to(tl.int64) * LP
    i = tl.arange(0, BC)
    ti = c * Q + i
    inq = i < Q
    vi = inq & (ti < L)
    gam = tl.load(gam_ptr + row + ti, mask=inq, other=0.0)
    beta = tl.load(beta_ptr + row + ti, mask=inq, other=0.0)
    e = tl.where(inq, tl.exp(gam.to(tl.float32)), 0.0)
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h * s_vh

    kk = tl.zeros((BC, BC), dtype=tl.float32)
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        kt = tl.load(k_base + ti[:, None] * s_kl + d[None, :] * s_kd, mask=vi[:, None] & (d < DK)[None, :], other=0.0)
        kk += _mm(kt, tl.trans(kt), DOT, IEEE)
    strict = (i[:, None] > i[None, :]) & inq[:, None] & inq[None, :]
    A = tl.where(strict, beta[:, None] * kk * _decay(gam, gam, strict), 0.0)

    t_base = T_ptr + (bh.to(tl.int64) * NC + c) * Q * Q
    if SOLVE_BLOCKS:
        T = _solve_blocks(t_base, A, i, inq, Q, BC)
    else:
        T = _solve_rows(t_base, A, i, inq, Q)
    if STORE_T:
        tl.debug_barrier()  # every read of the scratch done before T overwrites it
        tl.store(t_base + i[:, None] * Q + i[None, :], T, mask=inq[:, None] & inq[None, :])

    for d0 in range(0, DV, BV):
        d = d0 + tl.arange(0, BV)
        vt = tl.load(v_base + ti[:, None] * s_vl + d[None, :] * s_vd, mask=vi[:, None] & (d < DV)[None, :], other=0.0)
        u = _mm(T, vt.to(tl.float32) * beta[:, None], DOT, IEEE)
        tl.store(U_ptr + (row + ti[:, None]) * DV + d[None, :], u, mask=inq[:, None] & (d < DV)[None, :])
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        kt = tl.load(k_base + ti[:, None] * s_kl + d[None, :] * s_kd, mask=vi[:, None] & (d < DK)[None, :], other=0.0)
        wk = _mm(T, kt.to(tl.float32) * (beta * e)[:, None], DOT, IEEE)
        tl.store(Wk_ptr + (row + ti[:, None]) * DK + d[None, :], wk, mask=inq[:, None] & (d < DK)[None, :])


@triton.jit
def _state_fwd_kernel(
    k_ptr, gam_ptr, U_ptr, Wk_ptr, init_ptr, states_ptr, W_ptr, final_ptr,
    L, Q, NC, H, DK, DV,
    s_kb, s_kl, s_kh, s_kd,
    s_ib, s_ih, s_ik, s_iv,
    HAS_INIT: tl.constexpr,
    BC: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    b = bh // H
    LP = NC * Q
    row = bh.to(tl.int64) * LP
    dk = tl.arange(0, BKF)
    dv = pid_v * BV + tl.arange(0, BV)
    vk = dk < DK
    vv = dv < DV
    m_s = vk[:, None] & vv[None, :]
    if HAS_INIT:
        S = tl.load(init_ptr + b.to(tl.int64) * s_ib + h * s_ih + dk[:, None] * s_ik + dv[None, :] * s_iv,
                    mask=m_s, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BKF, BV), dtype=tl.float32)
    i = tl.arange(0, BC)
    inq = i < Q
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
    st_base = states_ptr + bh.to(tl.int64) * NC * DK * DV
    for c in range(0, NC):
        tl.store(st_base + c * DK * DV + dk[:, None] * DV + dv[None, :], S, mask=m_s)
        ti = c * Q + i
        vi = inq & (ti < L)
        wk = tl.load(Wk_ptr + (row + ti[:, None]) * DK + dk[None, :], mask=inq[:, None] & vk[None, :], other=0.0)
        u = tl.load(U_ptr + (row + ti[:, None]) * DV + dv[None, :], mask=inq[:, None] & vv[None, :], other=0.0)
        w = u - _mm(wk, S, DOT, IEEE)
        tl.store(W_ptr + (row + ti[:, None]) * DV + dv[None, :], w, mask=inq[:, None] & vv[None, :])
        gl = tl.load(gam_ptr + row + c * Q + Q - 1)
        gi = tl.load(gam_ptr + row + ti, mask=inq, other=0.0)
        r = tl.where(inq, tl.exp((gl - gi).to(tl.float32)), 0.0)
        kt = tl.load(k_base + ti[:, None] * s_kl + dk[None, :] * s_kd, mask=vi[:, None] & vk[None, :], other=0.0)
        S = S * tl.exp(gl.to(tl.float32)) + _mm(tl.trans(kt.to(tl.float32) * r[:, None]), w, DOT, IEEE)
    tl.store(final_ptr + bh.to(tl.int64) * DK * DV + dk[:, None] * DV + dv[None, :], S, mask=m_s)


@triton.jit
def _out_fwd_kernel(
    q_ptr, k_ptr, gam_ptr, states_ptr, W_ptr, o_ptr,
    L, Q, NC, H, DK, DV, scale,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_ob, s_ol, s_oh, s_od,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    b = bh // H
    LP = NC * Q
    row = bh.to(tl.int64) * LP
    i = tl.arange(0, BC)
    ti = c * Q + i
    inq = i < Q
    vi = inq & (ti < L)
    gam = tl.load(gam_ptr + row + ti, mask=inq, other=0.0)
    e = tl.where(inq, tl.exp(gam.to(tl.float32)), 0.0)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h * s_qh
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
    o_base = o_ptr + b.to(tl.int64) * s_ob + h * s_oh
    st_base = states_ptr + (bh.to(tl.int64) * NC + c) * DK * DV
    qk = tl.zeros((BC, BC), dtype=tl.float32)
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        vd = d < DK
        qt = tl.load(q_base + ti[:, None] * s_ql + d[None, :] * s_qd, mask=vi[:, None] & vd[None, :], other=0.0)
        kT = tl.load(k_base + ti[None, :] * s_kl + d[:, None] * s_kd, mask=vi[None, :] & vd[:, None], other=0.0)
        qk += _mm(qt, kT, DOT, IEEE)
    causal = (i[:, None] >= i[None, :]) & inq[:, None] & inq[None, :]
    p = qk * _decay(gam, gam, causal)
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        vv = dv < DV
        qs = tl.zeros((BC, BV), dtype=tl.float32)
        for d0 in range(0, DK, BK):
            d = d0 + tl.arange(0, BK)
            vd = d < DK
            qt = tl.load(q_base + ti[:, None] * s_ql + d[None, :] * s_qd, mask=vi[:, None] & vd[None, :], other=0.0)
            s = tl.load(st_base + d[:, None] * DV + dv[None, :], mask=vd[:, None] & vv[None, :], other=0.0)
            qs += _mm(qt, s, DOT, IEEE)
        w = tl.load(W_ptr + (row + ti[:, None]) * DV + dv[None, :], mask=inq[:, None] & vv[None, :], other=0.0)
        o = (e[:, None] * qs + _mm(p, w, DOT, IEEE)) * scale
        tl.store(o_base + ti[:, None] * s_ol + dv[None, :] * s_od, o.to(o_ptr.dtype.element_ty),
                 mask=vi[:, None] & vv[None, :])


@triton.jit
def _dw_local_kernel(
    q_ptr, k_ptr, gam_ptr, do_ptr, dWl_ptr,
    L, Q, NC, H, DK, DV, scale,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_ob, s_ol, s_oh, s_od,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    b = bh // H
    LP = NC * Q
    row = bh.to(tl.int64) * LP
    i = tl.arange(0, BC)
    ti = c * Q + i
    inq = i < Q
    vi = inq & (ti < L)
    gam = tl.load(gam_ptr + row + ti, mask=inq, other=0.0)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h * s_qh
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
    do_base = do_ptr + b.to(tl.int64) * s_ob + h * s_oh
    # kq[j, i] = k_j . q_i  (the transpose of Q K^T)
    kq = tl.zeros((BC, BC), dtype=tl.float32)
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        vd = d < DK
        kt = tl.load(k_base + ti[:, None] * s_kl + d[None, :] * s_kd, mask=vi[:, None] & vd[None, :], other=0.0)
        qT = tl.load(q_base + ti[None, :] * s_ql + d[:, None] * s_qd, mask=vi[None, :] & vd[:, None], other=0.0)
        kq += _mm(kt, qT, DOT, IEEE)
    # pT[j, i] = P[i, j] = q_i . k_j exp(gamma_i - gamma_j) for i >= j
    causal_T = (i[:, None] <= i[None, :]) & inq[:, None] & inq[None, :]
    pT = kq * tl.exp(tl.where(causal_T, (gam[None, :] - gam[:, None]).to(tl.float32), float("-inf"))) * scale
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        vv = dv < DV
        do = tl.load(do_base + ti[:, None] * s_ol + dv[None, :] * s_od, mask=vi[:, None] & vv[None, :], other=0.0)
        tl.store(dWl_ptr + (row + ti[:, None]) * DV + dv[None, :], _mm(pT, do, DOT, IEEE),
                 mask=inq[:, None] & vv[None, :])


@triton.jit
def _state_bwd_kernel(
    q_ptr, k_ptr, gam_ptr, Wk_ptr, do_ptr, dWl_ptr, dfinal_ptr, dstates_ptr, dW_ptr, dinit_ptr,
    L, Q, NC, H, DK, DV, scale,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_ob, s_ol, s_oh, s_od,
    s_fb, s_fh, s_fk, s_fv,
    HAS_DFINAL: tl.constexpr,
    BC: tl.constexpr, BKF: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    pid_v = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    b = bh // H
    LP = NC * Q
    row = bh.to(tl.int64) * LP
    dk = tl.arange(0, BKF)
    dv = pid_v * BV + tl.arange(0, BV)
    vk = dk < DK
    vv = dv < DV
    m_s = vk[:, None] & vv[None, :]
    if HAS_DFINAL:
        dS = tl.load(dfinal_ptr + b.to(tl.int64) * s_fb + h * s_fh + dk[:, None] * s_fk + dv[None, :] * s_fv,
                     mask=m_s, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BKF, BV), dtype=tl.float32)
    i = tl.arange(0, BC)
    inq = i < Q
    q_base = q_ptr + b.to(tl.int64) * s_qb + h * s_qh
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
    do_base = do_ptr + b.to(tl.int64) * s_ob + h * s_oh
    ds_base = dstates_ptr + bh.to(tl.int64) * NC * DK * DV
    for cc in range(0, NC):
        c = NC - 1 - cc
        # dS: gradient of the state leaving chunk c
        tl.store(ds_base + c * DK * DV + dk[:, None] * DV + dv[None, :], dS, mask=m_s)
        ti = c * Q + i
        vi = inq & (ti < L)
        gl = tl.load(gam_ptr + row + c * Q + Q - 1)
        gi = tl.load(gam_ptr + row + ti, mask=inq, other=0.0)
        r = tl.where(inq, tl.exp((gl - gi).to(tl.float32)), 0.0)
        e = tl.where(inq, tl.exp(gi.to(tl.float32)), 0.0)
        kt = tl.load(k_base + ti[:, None] * s_kl + dk[None, :] * s_kd, mask=vi[:, None] & vk[None, :], other=0.0)
        dwl = tl.load(dWl_ptr + (row + ti[:, None]) * DV + dv[None, :], mask=inq[:, None] & vv[None, :], other=0.0)
        dw = dwl + _mm(kt.to(tl.float32) * r[:, None], dS, DOT, IEEE)
        tl.store(dW_ptr + (row + ti[:, None]) * DV + dv[None, :], dw, mask=inq[:, None] & vv[None, :])
        qt = tl.load(q_base + ti[:, None] * s_ql + dk[None, :] * s_qd, mask=vi[:, None] & vk[None, :], other=0.0)
        do = tl.load(do_base + ti[:, None] * s_ol + dv[None, :] * s_od, mask=vi[:, None] & vv[None, :], other=0.0)
        wk = tl.load(Wk_ptr + (row + ti[:, None]) * DK + dk[None, :], mask=inq[:, None] & vk[None, :], other=0.0)
        dS = (dS * tl.exp(gl.to(tl.float32))
              + _mm(tl.trans(qt.to(tl.float32) * (e * scale)[:, None]), do, DOT, IEEE)
              - _mm(tl.trans(wk), dw, DOT, IEEE))
    tl.store(dinit_ptr + bh.to(tl.int64) * DK * DV + dk[:, None] * DV + dv[None, :], dS, mask=m_s)


@triton.jit
def _dqk_kernel(
    q_ptr, k_ptr, gam_ptr, do_ptr, states_ptr, dstates_ptr, W_ptr, dW_ptr,
    dq_ptr, dk_ptr, dWk_ptr, dgam_ptr,
    L, Q, NC, H, DK, DV, scale,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_ob, s_ol, s_oh, s_od,
    s_xb, s_xl, s_xh, s_xd,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    pid_k = tl.program_id(2)
    h = bh % H
    b = bh // H
    LP = NC * Q
    row = bh.to(tl.int64) * LP
    i = tl.arange(0, BC)
    ti = c * Q + i
    inq = i < Q
    vi = inq & (ti < L)
    d = pid_k * BK + tl.arange(0, BK)
    vd = d < DK
    m_id = vi[:, None] & vd[None, :]
    gam = tl.load(gam_ptr + row + ti, mask=inq, other=0.0)
    gl = tl.load(gam_ptr + row + c * Q + Q - 1)
    e = tl.where(inq, tl.exp(gam.to(tl.float32)), 0.0)
    r = tl.where(inq, tl.exp((gl - gam).to(tl.float32)), 0.0)
    qt = tl.load(q_ptr + b.to(tl.int64) * s_qb + h * s_qh + ti[:, None] * s_ql + d[None, :] * s_qd,
                 mask=m_id, other=0.0)
    kt = tl.load(k_ptr + b.to(tl.int64) * s_kb + h * s_kh + ti[:, None] * s_kl + d[None, :] * s_kd,
                 mask=m_id, other=0.0)
    do_base = do_ptr + b.to(tl.int64) * s_ob + h * s_oh
    st_base = states_ptr + (bh.to(tl.int64) * NC + c) * DK * DV
    ds_base = dstates_ptr + (bh.to(tl.int64) * NC + c) * DK * DV

    dqs = tl.zeros((BC, BK), dtype=tl.float32)   # dO S^T
    dp = tl.zeros((BC, BC), dtype=tl.float32)    # dO W^T
    dks = tl.zeros((BC, BK), dtype=tl.float32)   # W dS'^T
    dwk = tl.zeros((BC, BK), dtype=tl.float32)   # dW S^T
    sds = tl.zeros((BK, BV), dtype=tl.float32)   # S o dS', summed at the end
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        vv = dv < DV
        m_iv = inq[:, None] & vv[None, :]
        do = tl.load(do_base + ti[:, None] * s_ol + dv[None, :] * s_od, mask=vi[:, None] & vv[None, :], other=0.0)
        w = tl.load(W_ptr + (row + ti[:, None]) * DV + dv[None, :], mask=m_iv, other=0.0)
        dw = tl.load(dW_ptr + (row + ti[:, None]) * DV + dv[None, :], mask=m_iv, other=0.0)
        m_kv = vd[:, None] & vv[None, :]
        s = tl.load(st_base + d[:, None] * DV + dv[None, :], mask=m_kv, other=0.0)
        ds = tl.load(ds_base + d[:, None] * DV + dv[None, :], mask=m_kv, other=0.0)
        dqs += _mm(do, tl.trans(s), DOT, IEEE)
        dp += _mm(do, tl.trans(w), DOT, IEEE)
        dks += _mm(w, tl.trans(ds), DOT, IEEE)
        dwk += _mm(dw, tl.trans(s), DOT, IEEE)
        sds += s * ds

    causal = (i[:, None] >= i[None, :]) & inq[:, None] & inq[None, :]
    dpg = dp * _decay(gam, gam, causal)
    qf = qt.to(tl.float32)
    kf = kt.to(tl.float32)
    dQ = (e[:, None] * dqs + _mm(dpg, kt, DOT, IEEE)) * scale
    dKP = _mm(tl.trans(dpg), qt, DOT, IEEE) * scale
    dKS = r[:, None] * dks
    tl.store(dq_ptr + b.to(tl.int64) * s_xb + h * s_xh + ti[:, None] * s_xl + d[None, :] * s_xd,
             dQ.to(dq_ptr.dtype.element_ty), mask=m_id)
    m_pad = inq[:, None] & vd[None, :]
    tl.store(dk_ptr + (row + ti[:, None]) * DK + d[None, :], dKP + dKS, mask=m_pad)
    tl.store(dWk_ptr + (row + ti[:, None]) * DK + d[None, :], -dwk, mask=m_pad)
    xs = tl.sum(kf * dKS, axis=1)
    dg = tl.sum(qf * dQ, axis=1) - tl.sum(kf * dKP, axis=1) - xs
    last = tl.sum(xs, axis=0) + tl.exp(gl.to(tl.float32)) * tl.sum(tl.sum(sds, axis=1), axis=0)
    dg += tl.where(i == Q - 1, last, 0.0)
    tl.store(dgam_ptr + (bh.to(tl.int64) * tl.num_programs(2) + pid_k) * LP + ti, dg, mask=inq)


@triton.jit
def _wy_bwd_kernel(
    k_ptr, v_ptr, gam_ptr, beta_ptr, T_ptr, dW_ptr, dWk_ptr, dkp_ptr,
    dk_ptr, dv_ptr, dbeta_ptr, dgam_ptr,
    L, Q, NC, H, DK, DV,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_xb, s_xl, s_xh, s_xd,
    s_yb, s_yl, s_yh, s_yd,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT: tl.constexpr, IEEE: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    h = bh % H
    b = bh // H
    LP = NC * Q
    row = bh.to(tl.int64) * LP
    i = tl.arange(0, BC)
    ti = c * Q + i
    inq = i < Q
    vi = inq & (ti < L)
    gam = tl.load(gam_ptr + row + ti, mask=inq, other=0.0)
    beta = tl.load(beta_ptr + row + ti, mask=inq, other=0.0)
    e = tl.where(inq, tl.exp(gam.to(tl.float32)), 0.0)
    be = beta * e
    T = tl.load(T_ptr + (bh.to(tl.int64) * NC + c) * Q * Q + i[:, None] * Q + i[None, :],
                mask=inq[:, None] & inq[None, :], other=0.0)
    Tt = tl.trans(T)
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h * s_vh

    dT = tl.zeros((BC, BC), dtype=tl.float32)
    kk = tl.zeros((BC, BC), dtype=tl.float32)
    dbeta = tl.zeros((BC,), dtype=tl.float32)
    dg = tl.zeros((BC,), dtype=tl.float32)
    # U = T diag(beta) V:  dT += dU (beta V)^T, d(beta V) = T^T dU
    for v0 in range(0, DV, BV):
        dv = v0 + tl.arange(0, BV)
        vv = dv < DV
        vt = tl.load(v_base + ti[:, None] * s_vl + dv[None, :] * s_vd, mask=vi[:, None] & vv[None, :], other=0.0)
        vf = vt.to(tl.float32)
        du = tl.load(dW_ptr + (row + ti[:, None]) * DV + dv[None, :], mask=inq[:, None] & vv[None, :], other=0.0)
        dT += _mm(du, tl.trans(vf * beta[:, None]), DOT, IEEE)
        tv = _mm(Tt, du, DOT, IEEE)
        dbeta += tl.sum(vf * tv, axis=1)
        tl.store(dv_ptr + b.to(tl.int64) * s_yb + h * s_yh + ti[:, None] * s_yl + dv[None, :] * s_yd,
                 (tv * beta[:, None]).to(dv_ptr.dtype.element_ty), mask=vi[:, None] & vv[None, :])
    # Wk = T diag(beta e) K
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        vd = d < DK
        kt = tl.load(k_base + ti[:, None] * s_kl + d[None, :] * s_kd, mask=vi[:, None] & vd[None, :], other=0.0)
        kf = kt.to(tl.float32)
        dwk = tl.load(dWk_ptr + (row + ti[:, None]) * DK + d[None, :], mask=inq[:, None] & vd[None, :], other=0.0)
        dT += _mm(dwk, tl.trans(kf * be[:, None]), DOT, IEEE)
        x = tl.sum(kf * _mm(Tt, dwk, DOT, IEEE), axis=1)
        dbeta += e * x
        dg += be * x
        kk += _mm(kt, tl.trans(kt), DOT, IEEE)

    # T = (I + A)^-1:  dA = -T^T dT T^T on the strict lower triangle
    strict = (i[:, None] > i[None, :]) & inq[:, None] & inq[None, :]
    dA = -_mm(_mm(Tt, dT, DOT, IEEE), Tt, DOT, IEEE)
    dA = tl.where(strict, dA, 0.0)
    gm = _decay(gam, gam, strict)
    Bm = kk * gm                          # A = diag(beta) Bm
    dbeta += tl.sum(dA * Bm, axis=1)
    dB = beta[:, None] * dA
    xx = dB * Bm
    dg += tl.sum(xx, axis=1) - tl.sum(xx, axis=0)
    dBG = dB * gm
    dBGt = tl.trans(dBG)
    for d0 in range(0, DK, BK):
        d = d0 + tl.arange(0, BK)
        vd = d < DK
        m_pad = inq[:, None] & vd[None, :]
        kt = tl.load(k_base + ti[:, None] * s_kl + d[None, :] * s_kd, mask=vi[:, None] & vd[None, :], other=0.0)
        dwk = tl.load(dWk_ptr + (row + ti[:, None]) * DK + d[None, :], mask=m_pad, other=0.0)
        dkp = tl.load(dkp_ptr + (row + ti[:, None]) * DK + d[None, :], mask=m_pad, other=0.0)
        dkk = (dkp + be[:, None] * _mm(Tt, dwk, DOT, IEEE)
               + _mm(dBG, kt, DOT, IEEE) + _mm(dBGt, kt, DOT, IEEE))
        tl.store(dk_ptr + b.to(tl.int64) * s_xb + h * s_xh + ti[:, None] * s_xl + d[None, :] * s_xd,
                 dkk.to(dk_ptr.dtype.element_ty), mask=vi[:, None] & vd[None, :])
    tl.store(dbeta_ptr + row + ti, dbeta, mask=inq)
    tl.store(dgam_ptr + row + ti, dg, mask=inq)


# --------------------------------------------------------------------------
# launch helpers
# --------------------------------------------------------------------------

_STAGES: dict[str, int] = {}  # kernel name -> num_stages after an out-of-shared-memory fallback


def _launch(kernel, grid, *args, **kw):
    """kernel[grid](*args, **kw), retried with num_stages=1 if the pipelined
    variant needs more shared memory than the GPU has (remembered per kernel).
    A launch pinned through LAUNCH (a sweep's variant) is never retried: the
    sweep must see that the variant it asked for does not fit."""
    name = kernel.fn.__name__
    pinned = bool(LAUNCH.get(_short(name)))
    if name in _STAGES and not pinned:
        kw["num_stages"] = _STAGES[name]
    try:
        kernel[grid](*args, **kw)
    except OutOfResources:
        if pinned or kw.get("num_stages") == 1:
            raise
        kw["num_stages"] = _STAGES[name] = 1
        kernel[grid](*args, **kw)


def _short(kernel_name: str) -> str:
    """"_wy_fwd_kernel" -> "wy_fwd" (the names of KERNELS, TUNED and LAUNCH)."""
    return kernel_name[1:-len("_kernel")]


# Launch configuration per kernel: (BK, BV, num_warps, num_stages) for half
# inputs (bf16/fp16, tensor-core operands) and for float32 (IEEE float32
# dots, which need twice the registers and shared memory per tile). Chosen
# by compiling every launch for sm_90 at the model shapes (dk = dv = 128,
# C = 64) and keeping the configurations without register spills that fit
# in shared memory; BK / BV are capped by dk / dv. Not timed on a GPU yet.
_CONFIG = {
    #                   half              float32
    "_wy_fwd_kernel":    ((64, 64, 4, 2), (32, 32, 8, 1)),
    "_state_fwd_kernel": ((0, 32, 8, 2),  (0, 16, 8, 1)),
    "_out_fwd_kernel":   ((64, 64, 4, 2), (32, 32, 8, 1)),
    "_dw_local_kernel":  ((64, 64, 4, 2), (32, 32, 8, 1)),
    "_state_bwd_kernel": ((0, 32, 8, 2),  (0, 16, 8, 1)),
    "_dqk_kernel":       ((64, 32, 8, 2), (32, 16, 8, 1)),
    "_wy_bwd_kernel":    ((64, 64, 8, 2), (32, 32, 8, 1)),
}


# How _wy_fwd_kernel solves T = (I + A)^-1: "blocks" (16 x 16 diagonal blocks
# by substitution together, then 16 x 16 dots; the default) or "rows" (C - 1
# sequential row steps on the whole C x C tile; the eighth session's profile
# of nam-1b had the kernel at 10.1 ms a step). Both are checked by the tests.
SOLVE = "blocks"


def _solve_blocks_on() -> bool:
    if SOLVE not in ("blocks", "rows"):
        raise ValueError(f"triton_delta_rule.SOLVE = {SOLVE!r}: expected 'blocks' or 'rows'")
    return SOLVE == "blocks"


# Per-kernel overrides of _CONFIG (short names; keys BK, BV, num_warps,
# num_stages), as for the Triton SSD: TUNED holds what a sweep on a GPU chose
# (benchmarks/delta_tune.py; half-precision operands only: the sweep runs in
# bf16), LAUNCH what a sweep is trying now. Neither applies under the
# interpreter (CPU tests), which checks the defaults.
KERNELS = tuple(_short(k) for k in _CONFIG)
# Chosen by `python3 benchmarks/delta_tune.py` on an H200 (2026-11-28) at
# nam-125m's layer in bf16 (16 x 2048 tokens, 6 heads, dk = dv = 128): the
# kernels' own times fell 4-50% (wy_bwd 0.514 -> 0.259 ms, dqk 0.621 -> 0.373,
# wy_fwd 0.587 -> 0.375 for its two calls); outputs equal the defaults' to
# 2.3e-4 (relative norm) there and at nam-1b's layer (BENCHMARKS.md).
TUNED: dict[str, dict] = {k: {} for k in KERNELS}
TUNED.update({
    "wy_fwd": {"num_warps": 2, "num_stages": 3},
    "state_fwd": {"num_warps": 4, "num_stages": 3},
    "out_fwd": {"num_warps": 2},
    "dw_local": {"num_stages": 3},
    "state_bwd": {"BV": 128},
    "dqk": {"BK": 128, "num_stages": 3},
    "wy_bwd": {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 1},
})
LAUNCH: dict[str, dict] = {k: {} for k in KERNELS}


def _cfg(name: str, p) -> dict:
    bk, bv, nw, ns = _CONFIG[name][1 if p.ieee else 0]
    out = dict(BV=bv, num_warps=nw, num_stages=ns)
    if bk:
        out["BK"] = bk
    if not INTERPRET:
        short = _short(name)
        for over in ((TUNED[short] if not p.ieee else {}), LAUNCH[short]):
            bad = set(over) - set(out)
            if bad:
                raise ValueError(f"triton_delta_rule: {short} has no launch option {sorted(bad)} "
                                 f"(it takes {sorted(out)})")
            out.update(over)
    out["BV"] = _blk(p.dv, out["BV"])
    if "BK" in out:
        out["BK"] = _blk(p.dk, out["BK"])
    return out


class _Prep:
    """Shapes, blocks, float64 within-chunk cumsum of g and padded float32 beta, both (b*h, nc*C)."""

    def __init__(self, q, k, v, g, beta, chunk_size, scale):
        b, l, h, dk = q.shape
        dv = v.shape[-1]
        self.b, self.l, self.h, self.dk, self.dv = b, l, h, dk, dv
        self.q = int(chunk_size)
        self.nc = -(-l // self.q)
        self.lp = self.nc * self.q
        self.scale = float(dk ** -0.5 if scale is None else scale)
        gp = torch.zeros(b, h, self.lp, device=q.device, dtype=torch.float64)
        gp[:, :, :l] = g.permute(0, 2, 1)
        self.gam = gp.view(b, h, self.nc, self.q).cumsum(-1).view(b * h, self.lp)
        bp = torch.zeros(b, h, self.lp, device=q.device, dtype=torch.float32)
        bp[:, :, :l] = beta.permute(0, 2, 1)
        self.beta = bp.view(b * h, self.lp)
        self.dot, self.ieee = _dot_dtype(q)
        self.bc = _blk(self.q, MAX_CHUNK)
        self.bkf = _blk(dk, MAX_DK)
        self.kw = dict(DOT=self.dot, IEEE=self.ieee)

    def f32(self, *shape):
        return torch.empty(*shape, device=self.gam.device, dtype=torch.float32)


def _wy_fwd(p: _Prep, k, v, store_t: bool):
    bh = p.b * p.h
    T = p.f32(bh, p.nc, p.q, p.q)  # scratch for A, then T itself if store_t
    U = p.f32(bh, p.lp, p.dv)
    Wk = p.f32(bh, p.lp, p.dk)
    _launch(_wy_fwd_kernel, (p.nc, bh),
        k, v, p.gam, p.beta, T, U, Wk,
        p.l, p.q, p.nc, p.h, p.dk, p.dv,
        *k.stride(), *v.stride(),
        STORE_T=store_t, SOLVE_BLOCKS=_solve_blocks_on(), BC=p.bc, **_cfg("_wy_fwd_kernel", p), **p.kw,
    )
    return T, U, Wk


def _state_fwd(p: _Prep, k, U, Wk, initial_state):
    bh = p.b * p.h
    states = p.f32(bh, p.nc, p.dk, p.dv)
    W = p.f32(bh, p.lp, p.dv)
    final = p.f32(bh, p.dk, p.dv)
    init = initial_state if initial_state is not None else final.view(p.b, p.h, p.dk, p.dv)
    cfg = _cfg("_state_fwd_kernel", p)
    _launch(_state_fwd_kernel, (triton.cdiv(p.dv, cfg["BV"]), bh),
        k, p.gam, U, Wk, init, states, W, final,
        p.l, p.q, p.nc, p.h, p.dk, p.dv,
        *k.stride(), *init.stride(),
        HAS_INIT=initial_state is not None,
        BC=p.bc, BKF=p.bkf, **cfg, **p.kw,
    )
    return states, W, final.view(p.b, p.h, p.dk, p.dv)


def _forward(q, k, v, g, beta, initial_state, chunk_size, scale, keep=False):
    """(o, final) and, with keep, (T, Wk, states, W): what the backward would recompute."""
    p = _Prep(q, k, v, g, beta, chunk_size, scale)
    T, U, Wk = _wy_fwd(p, k, v, store_t=keep)
    states, W, final = _state_fwd(p, k, U, Wk, initial_state)
    del U
    o = torch.empty(p.b, p.l, p.h, p.dv, device=q.device, dtype=q.dtype)
    _launch(_out_fwd_kernel, (p.nc, p.b * p.h),
        q, k, p.gam, states, W, o,
        p.l, p.q, p.nc, p.h, p.dk, p.dv, p.scale,
        *q.stride(), *k.stride(), *o.stride(),
        BC=p.bc, **_cfg("_out_fwd_kernel", p), **p.kw,
    )
    if keep:
        return o, final.to(q.dtype), (T, Wk, states, W)
    return o, final.to(q.dtype)


def _backward(do, dfinal, q, k, v, g, beta, initial_state, chunk_size, scale, kept=None):
    """kept: the forward's (T, Wk, states, W), or None to rerun _wy_fwd and _state_fwd."""
    p = _Prep(q, k, v, g, beta, chunk_size, scale)
    bh, nc, lp, dk, dv = p.b * p.h, p.nc, p.lp, p.dk, p.dv
    if kept is not None:
        T, Wk, states, W = kept
    else:
        T, U, Wk = _wy_fwd(p, k, v, store_t=True)
        states, W, _ = _state_fwd(p, k, U, Wk, initial_state)
        del U

    # (causal(Q K^T o Gam))^T dO
    dWl = p.f32(bh, lp, dv)
    _launch(_dw_local_kernel, (nc, bh),
        q, k, p.gam, do, dWl,
        p.l, p.q, nc, p.h, dk, dv, p.scale,
        *q.stride(), *k.stride(), *do.stride(),
        BC=p.bc, **_cfg("_dw_local_kernel", p), **p.kw,
    )

    # reverse scan across chunks
    dstates = torch.empty_like(states)
    dW = p.f32(bh, lp, dv)
    dinit = p.f32(p.b, p.h, dk, dv)
    df = dfinal if dfinal is not None else dinit
    cfg = _cfg("_state_bwd_kernel", p)
    _launch(_state_bwd_kernel, (triton.cdiv(dv, cfg["BV"]), bh),
        q, k, p.gam, Wk, do, dWl, df, dstates, dW, dinit,
        p.l, p.q, nc, p.h, dk, dv, p.scale,
        *q.stride(), *k.stride(), *do.stride(), *df.stride(),
        HAS_DFINAL=dfinal is not None,
        BC=p.bc, BKF=p.bkf, **cfg, **p.kw,
    )
    del dWl, Wk

    # dq; O- and S'-parts of dk; dWk
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk_part = p.f32(bh, lp, dk)
    dWk = p.f32(bh, lp, dk)
    cfg = _cfg("_dqk_kernel", p)
    nkb = triton.cdiv(dk, cfg["BK"])
    dgam_o = p.f32(bh, nkb, lp)
    _launch(_dqk_kernel, (nc, bh, nkb),
        q, k, p.gam, do, states, dstates, W, dW,
        dq, dk_part, dWk, dgam_o,
        p.l, p.q, nc, p.h, dk, dv, p.scale,
        *q.stride(), *k.stride(), *do.stride(), *dq.stride(),
        BC=p.bc, **cfg, **p.kw,
    )
    del states, dstates, W

    # through the WY step
    dk_ = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv_ = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    dbeta = p.f32(bh, lp)
    dgam_wy = p.f32(bh, lp)
    _launch(_wy_bwd_kernel, (nc, bh),
        k, v, p.gam, p.beta, T, dW, dWk, dk_part,
        dk_, dv_, dbeta, dgam_wy,
        p.l, p.q, nc, p.h, dk, dv,
        *k.stride(), *v.stride(), *dk_.stride(), *dv_.stride(),
        BC=p.bc, **_cfg("_wy_bwd_kernel", p), **p.kw,
    )

    # glue: d(g_k) = sum over the steps i >= k of its chunk of d(gamma_i)
    dgam = dgam_o.sum(1, dtype=torch.float64) + dgam_wy.double()
    dg = dgam.view(p.b, p.h, nc, p.q).flip(-1).cumsum(-1).flip(-1).view(p.b, p.h, lp)
    dg = dg[:, :, :p.l].permute(0, 2, 1).to(g.dtype).contiguous()
    db = dbeta.view(p.b, p.h, lp)[:, :, :p.l].permute(0, 2, 1).to(beta.dtype).contiguous()
    return dq, dk_, dv_, dg, db, (dinit.to(initial_state.dtype) if initial_state is not None else None)


# --------------------------------------------------------------------------
# custom ops + autograd
# --------------------------------------------------------------------------

_SIX = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("megacpp::gated_delta_rule_triton_fwd", mutates_args=())
def _gdr_fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                initial_state: Optional[torch.Tensor], chunk_size: int,
                scale: float, keep: bool) -> _SIX:
    """(o, final) + (keep: the backward's T, Wk, states, W; else four empty tensors)."""
    with _device_ctx(q):
        if keep:
            o, final, kept = _forward(q, k, v, g, beta, initial_state, chunk_size, scale, keep=True)
            return (o, final, *kept)
        o, final = _forward(q, k, v, g, beta, initial_state, chunk_size, scale)
    return (o, final, *(q.new_empty(0) for _ in range(4)))


def _kept_shapes(q, v, chunk_size):
    """(T, Wk, states, W) shapes, all float32: (b*h, nc, C, C), (b*h, nc*C, dk),
    (b*h, nc, dk, dv), (b*h, nc*C, dv)."""
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    nc = -(-l // chunk_size)
    bh, lp = b * h, nc * chunk_size
    return (bh, nc, chunk_size, chunk_size), (bh, lp, dk), (bh, nc, dk, dv), (bh, lp, dv)


@_gdr_fwd_op.register_fake
def _(q, k, v, g, beta, initial_state, chunk_size, scale, keep):
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    out = (q.new_empty(b, l, h, dv), q.new_empty(b, h, dk, dv))
    if keep:
        return out + tuple(q.new_empty(shape, dtype=torch.float32) for shape in _kept_shapes(q, v, chunk_size))
    return out + tuple(q.new_empty(0) for _ in range(4))


@torch.library.custom_op("megacpp::gated_delta_rule_triton_bwd", mutates_args=())
def _gdr_bwd_op(do: torch.Tensor, dfinal: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, initial_state: Optional[torch.Tensor],
                chunk_size: int, scale: float, kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """kept: the forward's [T, Wk, states, W], or [] to recompute them."""
    with _device_ctx(q):
        dq, dk, dv, dg, db, dinit = _backward(do, dfinal, q, k, v, g, beta, initial_state, chunk_size, scale,
                                              kept or None)
    # absent initial_state: an empty placeholder (custom-op outputs may not alias)
    return [dq, dk, dv, dg, db, dinit if dinit is not None else q.new_empty(0)]


@_gdr_bwd_op.register_fake
def _(do, dfinal, q, k, v, g, beta, initial_state, chunk_size, scale, kept):
    cf = torch.contiguous_format
    return [torch.empty_like(q, memory_format=cf), torch.empty_like(k, memory_format=cf),
            torch.empty_like(v, memory_format=cf), torch.empty_like(g, memory_format=cf),
            torch.empty_like(beta, memory_format=cf),
            torch.empty_like(initial_state, memory_format=cf) if initial_state is not None else q.new_empty(0)]


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, initial_state, chunk_size, scale, keep = inputs
    kept = list(output[2:]) if keep else []
    ctx.save_for_backward(q, k, v, g, beta, initial_state, *kept)
    ctx.mark_non_differentiable(*output[2:])
    ctx.chunk_size = chunk_size
    ctx.scale = scale
    ctx.has_init = initial_state is not None


def _backward_fn(ctx, do, dfinal, *_kept_grads):
    q, k, v, g, beta, initial_state, *kept = ctx.saved_tensors
    if do is None:
        b, l, h, _ = q.shape
        do = q.new_zeros(b, l, h, v.shape[-1])
    dq, dk, dv, dg, db, dinit = _gdr_bwd_op(do, dfinal, q, k, v, g, beta,
                                            initial_state if ctx.has_init else None, ctx.chunk_size, ctx.scale,
                                            kept)
    return dq, dk, dv, dg, db, (dinit if ctx.has_init else None), None, None, None


_gdr_fwd_op.register_autograd(_backward_fn, setup_context=_setup_context)


def gated_delta_rule_triton(q, k, v, g, beta, initial_state=None, chunk_size=64, scale=None,
                            keep_states=False):
    """Chunked gated delta rule in Triton; same arguments and returns as `reference.gated_delta_rule`.

    keep_states: keep T, Wk, the per-chunk states and W from the forward for
    the backward instead of rerunning _wy_fwd and _state_fwd there (speed for
    memory: float32, b*h*l*(C + dk + dv) + b*h*(l/C)*dk*dv elements, about
    0.45 GB a nam-125m layer at 16 x 2048)."""
    b, l, h, dk, dv = _check(q, k, v, g, beta, initial_state)
    if not 1 <= chunk_size <= MAX_CHUNK:
        raise ValueError(f"gated_delta_rule_triton: chunk_size must be in [1, {MAX_CHUNK}], got {chunk_size}")
    if dk > MAX_DK:
        raise ValueError(f"gated_delta_rule_triton: dk {dk} > {MAX_DK} is not supported")
    for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta), ("initial_state", initial_state)):
        if t is not None and t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"gated_delta_rule_triton: {name} is {t.dtype}; float64 (and other dtypes) "
                            "go to reference.gated_delta_rule")
    if l == 0:
        return _gdr_reference(q, k, v, g, beta, initial_state, chunk_size=chunk_size, scale=scale)
    scale = float(dk ** -0.5 if scale is None else scale)
    o, final, *_ = _gdr_fwd_op(q, k, v, g, beta, initial_state, int(chunk_size), scale, bool(keep_states))
    return o, final
