r"""Pure-torch reference for the gated delta rule (Gated DeltaNet).

Shapes follow flash-linear-attention (fla):
    q, k (batch, seqlen, heads, dk); v (batch, seqlen, heads, dv)
    g    (batch, seqlen, heads)  log decay, <= 0 (alpha_t = exp(g_t))
    beta (batch, seqlen, heads)  in (0, 1)
    state S (batch, heads, dk, dv)

Recurrence, per head, with S of shape (dk, dv):
    S_t = (I - beta_t k_t k_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T
        = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T
    o_t = S_t^T (scale * q_t)
scale defaults to dk ** -0.5 (fla's default). k is used as given: normalise
it beforehand if the model wants the usual L2-normalised keys.

Chunked form (per chunk of C steps, S_0 the state entering the chunk,
gamma_i = g_1 + ... + g_i inside the chunk). Unrolling the recurrence,
    S_i = e^{gamma_i} S_0 + sum_{j<=i} e^{gamma_i - gamma_j} k_j w_j^T
with the "pseudo values" w_i = beta_i (v_i - alpha_i S_{i-1}^T k_i). Putting
the unrolled S_{i-1} into w_i gives a unit lower-triangular system
    (I + A) W = diag(beta) V - diag(beta e^gamma) K S_0,
    A_ij = beta_i e^{gamma_i - gamma_j} (k_i . k_j)  for j < i, else 0,
so W = U - W_k S_0 with U = (I + A)^{-1} diag(beta) V and
W_k = (I + A)^{-1} diag(beta e^gamma) K (the WY / UT-transform step, which
does not depend on S_0 and is solved for all chunks at once). Then
    O   = scale * (diag(e^gamma) Q S_0 + (M o Q K^T) W),  M_ij = e^{gamma_i - gamma_j}, j <= i
    S_C = e^{gamma_C} S_0 + (diag(e^{gamma_C - gamma}) K)^T W
and only the last three lines run as a scan over chunks. Memory is
O(seqlen * chunk_size).

Half inputs are computed in float32; float64 stays float64. Outputs come
back in q's dtype.
"""
from __future__ import annotations

import torch

from .._common import compute_dtype, pad_seq, segsum


def _check(q, k, v, g, beta, initial_state):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must both be (batch, seqlen, heads, dk), got {tuple(q.shape)} and {tuple(k.shape)}"
        )
    b, l, h, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, l, h):
        raise ValueError(f"v must be ({b}, {l}, {h}, dv), got {tuple(v.shape)}")
    dv = v.shape[3]
    if g.shape != (b, l, h) or beta.shape != (b, l, h):
        raise ValueError(f"g and beta must be {(b, l, h)}, got {tuple(g.shape)} and {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, dk, dv):
        raise ValueError(f"initial_state must be {(b, h, dk, dv)}, got {tuple(initial_state.shape)}")
    return b, l, h, dk, dv


def gated_delta_rule_step(state, q_t, k_t, v_t, g_t, beta_t, scale=None):
    """One decoding step.

    state (batch, heads, dk, dv); q_t, k_t (batch, heads, dk);
    v_t (batch, heads, dv); g_t, beta_t (batch, heads).
    Returns (o_t (batch, heads, dv), new_state), both in q_t's dtype.
    """
    cdt = compute_dtype(state, q_t, k_t, v_t, g_t, beta_t)
    if scale is None:
        scale = q_t.shape[-1] ** -0.5
    s = state.to(cdt)
    qc, kc, vc = q_t.to(cdt), k_t.to(cdt), v_t.to(cdt)
    alpha = torch.exp(g_t.to(cdt))[..., None, None]
    bt = beta_t.to(cdt)[..., None]
    s = alpha * s
    # Delta-rule correction: replace what the decayed state predicts for k by v.
    pred = torch.einsum("bhkv,bhk->bhv", s, kc)
    s = s + kc[..., :, None] * (bt * (vc - pred))[..., None, :]
    o = torch.einsum("bhkv,bhk->bhv", s, qc * scale)
    return o.to(q_t.dtype), s.to(q_t.dtype)


def gated_delta_rule_recurrent(q, k, v, g, beta, initial_state=None, scale=None):
    """Step-by-step gated delta rule: the ground truth for `gated_delta_rule`.

    Same arguments and returns as `gated_delta_rule`, minus chunk_size.
    """
    b, l, h, dk, dv = _check(q, k, v, g, beta, initial_state)
    cdt = compute_dtype(q, k, v, g, beta, initial_state)
    if initial_state is None:
        s = q.new_zeros(b, h, dk, dv, dtype=cdt)
    else:
        s = initial_state.to(cdt)
    qc, kc, vc, gc, bc = (t.to(cdt) for t in (q, k, v, g, beta))
    outs = []
    for t in range(l):
        # State stays in the compute dtype between steps.
        o, s = gated_delta_rule_step(s, qc[:, t], kc[:, t], vc[:, t], gc[:, t], bc[:, t], scale)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else vc.new_zeros(b, 0, h, dv)
    return o.to(q.dtype), s.to(q.dtype)


def gated_delta_rule(q, k, v, g, beta, initial_state=None, chunk_size=64, scale=None):
    """Chunked gated delta rule. Returns (o (batch, seqlen, heads, dv), final_state (batch, heads, dk, dv)).

    seqlen need not be a multiple of chunk_size: the tail is padded with
    g = 0 and beta = 0, steps that keep the state exactly (alpha = 1, no
    write), so padding changes neither the outputs nor the final state.
    """
    b, l, h, dk, dv = _check(q, k, v, g, beta, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cdt = compute_dtype(q, k, v, g, beta, initial_state)
    if scale is None:
        scale = dk ** -0.5
    if initial_state is None:
        s = q.new_zeros(b, h, dk, dv, dtype=cdt)
    else:
        s = initial_state.to(cdt)
    if l == 0:
        return v.new_zeros(b, 0, h, dv, dtype=q.dtype), s.to(q.dtype)
    c = chunk_size
    pad = (-l) % c
    nc = (l + pad) // c

    def chunks(t):
        # (b, L, h, ...) -> (b, h, nc, c, ...)
        t = pad_seq(t.to(cdt), pad)
        t = t.reshape(b, nc, c, h, *t.shape[3:])
        return t.transpose(1, 3).transpose(2, 3)

    qc = chunks(q) * scale
    kc, vc = chunks(k), chunks(v)
    gc, bc = chunks(g), chunks(beta)  # (b, h, nc, c)

    gam = gc.cumsum(dim=-1)            # decay from chunk start through step i
    decay = torch.exp(segsum(gc))      # M_ij = e^{gamma_i - gamma_j} for j <= i, else 0
    kk = kc @ kc.transpose(-1, -2)
    a_mat = (bc[..., None] * decay * kk).tril(-1)
    eye = torch.eye(c, dtype=cdt, device=q.device)
    # One unit-lower-triangular solve gives U and W_k together.
    rhs = torch.cat([bc[..., None] * vc, (bc * torch.exp(gam))[..., None] * kc], dim=-1)
    sol = torch.linalg.solve_triangular(eye + a_mat, rhs, upper=False, unitriangular=True)
    u, wk = sol[..., :dv], sol[..., dv:]
    qk = (qc @ kc.transpose(-1, -2)) * decay
    q_dec = qc * torch.exp(gam)[..., None]
    k_to_end = kc * decay[..., -1, :, None]  # e^{gamma_C - gamma_j} k_j
    chunk_decay = torch.exp(gam[..., -1])    # (b, h, nc)

    outs = []
    for i in range(nc):
        w = u[:, :, i] - wk[:, :, i] @ s
        outs.append(q_dec[:, :, i] @ s + qk[:, :, i] @ w)
        s = chunk_decay[:, :, i, None, None] * s + k_to_end[:, :, i].transpose(-1, -2) @ w
    o = torch.stack(outs, dim=2)  # (b, h, nc, c, dv)
    o = o.permute(0, 2, 3, 1, 4).reshape(b, nc * c, h, dv)[:, :l]
    return o.to(q.dtype), s.to(q.dtype)
