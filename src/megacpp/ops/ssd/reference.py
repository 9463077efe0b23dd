"""Pure-torch reference for Mamba-2 SSD (state space duality).

Shapes follow mamba_ssm:
    x  (batch, seqlen, nheads, headdim)
    dt (batch, seqlen, nheads)          positive (softplus already applied)
    A  (nheads,)                        negative
    B, C (batch, seqlen, ngroups, dstate), nheads % ngroups == 0; head h
        reads group h // (nheads // ngroups)
    D  (nheads,) or None
    state (batch, nheads, headdim, dstate)
    starts (batch, seqlen) bool or None: document starts. No state flows
        into a step where starts is True: its log-decay dt_t * A is replaced
        by RESET_LOG_DECAY (exp of it is exactly 0); its input term
        dt_t x_t B_t^T and the skip D x_t are unchanged. (Packed rows
        without rescaling x, which the models did before.)

Recurrence, per head:
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t B_t^T     (headdim x dstate)
    y_t = h_t C_t + D * x_t

`ssd` evaluates it chunk by chunk: inside a chunk the outputs are a masked
(C B^T * decay) matmul, across chunks a short scan carries the state. Work
and memory are O(seqlen * chunk_size), never seqlen^2.

Half inputs are computed in float32; float64 stays float64. Outputs
(y and the final state) come back in x's dtype.
"""
from __future__ import annotations

import torch

from .._common import RESET_LOG_DECAY, compute_dtype, pad_seq, segsum


def _check(x, dt, A, B, C, D, initial_state, starts=None):
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"dt must be {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or B.shape != C.shape:
        raise ValueError(
            f"B and C must both be (batch, seqlen, ngroups, dstate) = ({b}, {l}, g, n), "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    g, n = B.shape[2], B.shape[3]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be a multiple of ngroups ({g})")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be ({h},), got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(f"initial_state must be {(b, h, p, n)}, got {tuple(initial_state.shape)}")
    if starts is not None and (starts.shape != (b, l) or starts.dtype != torch.bool):
        raise ValueError(f"starts must be bool {(b, l)}, got {starts.dtype} {tuple(starts.shape)}")
    return b, l, h, p, g, n


def log_decay(dt, A, starts=None):
    """dt * A (batch, seqlen, nheads), RESET_LOG_DECAY at the document starts."""
    a = dt * A
    if starts is not None:
        a = torch.where(starts[..., None], torch.full_like(a, RESET_LOG_DECAY), a)
    return a


def ssd_step(state, x_t, dt_t, A, B_t, C_t, D=None, start=None):
    """One decoding step.

    state (batch, nheads, headdim, dstate); x_t (batch, nheads, headdim);
    dt_t (batch, nheads); B_t, C_t (batch, ngroups, dstate); start (batch,)
    bool or None: where True, no state flows in (as `ssd`'s starts).
    Returns (y_t (batch, nheads, headdim), new_state), both in x_t's dtype.
    """
    cdt = compute_dtype(state, x_t, dt_t, A, B_t, C_t, D)
    b, h, p = x_t.shape
    g = B_t.shape[1]
    if h % g != 0:
        raise ValueError(f"nheads ({h}) must be a multiple of ngroups ({g})")
    # Heads of one group are contiguous, as in mamba_ssm.
    Bh = B_t.to(cdt).repeat_interleave(h // g, dim=1)  # (b, h, n)
    Ch = C_t.to(cdt).repeat_interleave(h // g, dim=1)
    xc, dtc = x_t.to(cdt), dt_t.to(cdt)
    decay = torch.exp(log_decay(dtc, A.to(cdt), start))  # (b, h)
    new = state.to(cdt) * decay[..., None, None] + (dtc[..., None] * xc)[..., :, None] * Bh[..., None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, Ch)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xc
    return y.to(x_t.dtype), new.to(x_t.dtype)


def ssd_recurrent(x, dt, A, B, C, D=None, initial_state=None, starts=None):
    """Step-by-step SSD: the ground truth `ssd` is tested against.

    Same arguments and returns as `ssd`, minus chunk_size.
    """
    b, l, h, p, g, n = _check(x, dt, A, B, C, D, initial_state, starts)
    cdt = compute_dtype(x, dt, A, B, C, D, initial_state)
    if initial_state is None:
        state = x.new_zeros(b, h, p, n, dtype=cdt)
    else:
        state = initial_state.to(cdt)
    xc, dtc, Bc, Cc = x.to(cdt), dt.to(cdt), B.to(cdt), C.to(cdt)
    ys = []
    for t in range(l):
        # Keep the state in the compute dtype between steps (ssd_step would
        # round it to x's dtype, which for bf16 would drift from `ssd`).
        y, state = ssd_step(state, xc[:, t], dtc[:, t], A, Bc[:, t], Cc[:, t], D,
                            starts[:, t] if starts is not None else None)
        ys.append(y)
    y = torch.stack(ys, dim=1) if ys else xc.new_zeros(b, 0, h, p)
    return y.to(x.dtype), state.to(x.dtype)


def ssd(x, dt, A, B, C, chunk_size, D=None, initial_state=None, starts=None, keep_states=False):
    """Chunked Mamba-2 SSD. Returns (y like x, final_state (batch, nheads, headdim, dstate)).

    keep_states: the Triton op's choice (keep its chunk states for the
    backward); accepted for the same signature and ignored here, where
    autograd keeps what the einsums need.

    seqlen need not be a multiple of chunk_size: the tail is padded with
    dt = 0, which leaves the state untouched (decay exp(0) = 1, input
    dt * x B^T = 0), so the padded steps change neither y nor the state.
    """
    b, l, h, p, g, n = _check(x, dt, A, B, C, D, initial_state, starts)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cdt = compute_dtype(x, dt, A, B, C, D, initial_state)
    if l == 0:
        s0 = x.new_zeros(b, h, p, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
        return x.clone(), s0.to(x.dtype)
    q = chunk_size
    pad = (-l) % q
    nc = (l + pad) // q
    hg = h // g

    # Chunk and split heads into (group, head-in-group) so B/C are shared
    # by broadcasting instead of being copied per head.
    xc = pad_seq(x.to(cdt), pad).reshape(b, nc, q, g, hg, p)
    dtc = pad_seq(dt.to(cdt), pad).reshape(b, nc, q, g, hg)
    Bc = pad_seq(B.to(cdt), pad).reshape(b, nc, q, g, n)
    Cc = pad_seq(C.to(cdt), pad).reshape(b, nc, q, g, n)

    # Log decays, laid out (b, nc, g, hg, q) so the chunk axis is last.
    st = None if starts is None else pad_seq(starts, pad).reshape(b, nc, q)
    a = log_decay(dtc.reshape(b, nc, q, h), A.to(cdt), st).reshape(b, nc, q, g, hg).permute(0, 1, 3, 4, 2)
    a_cum = a.cumsum(dim=-1)                 # decay from chunk start to i (inclusive)
    decay_in = torch.exp(segsum(a))          # (b, nc, g, hg, q, q): exp(sum a[j+1..i]), 0 above diag
    decay_to_end = decay_in[..., -1, :]      # from j (exclusive) to chunk end
    decay_from_start = torch.exp(a_cum)      # from chunk start (state before chunk) to i
    chunk_decay = torch.exp(a_cum[..., -1])  # (b, nc, g, hg): whole chunk

    xdt = xc * dtc[..., None]  # (b, nc, q, g, hg, p): input scaled by dt

    # 1) Intra-chunk output: y_i += sum_{j<=i} (C_i . B_j) decay(j->i) dt_j x_j
    # Pairwise contractions spelled out so no (.., q, q, headdim)-sized
    # intermediate can appear whatever order einsum would pick.
    cb = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)  # (b, nc, g, q, q), shared by heads of a group
    att = cb[:, :, :, None] * decay_in               # (b, nc, g, hg, q, q)
    y = torch.einsum("bcgkij,bcjgkp->bcigkp", att, xdt)

    # 2) State each chunk adds, measured at its own end.
    x_to_end = xdt * decay_to_end.permute(0, 1, 4, 2, 3)[..., None]  # (b, nc, q, g, hg, p)
    chunk_states = torch.einsum("bcjgkp,bcjgn->bcgkpn", x_to_end, Bc)

    # 3) Scan across chunks: states[c] is the state entering chunk c.
    if initial_state is None:
        s = xc.new_zeros(b, g, hg, p, n)
    else:
        s = initial_state.to(cdt).reshape(b, g, hg, p, n)
    entering = []
    for c in range(nc):
        entering.append(s)
        s = s * chunk_decay[:, c, ..., None, None] + chunk_states[:, c]
    states = torch.stack(entering, dim=1)  # (b, nc, g, hg, p, n)

    # 4) Contribution of the entering state: y_i += decay(start->i) * (S C_i)
    y_state = torch.einsum("bcgkpn,bcign->bcigkp", states, Cc)
    y = y + y_state * decay_from_start.permute(0, 1, 4, 2, 3)[..., None]

    if D is not None:
        y = y + xc * D.to(cdt).reshape(g, hg, 1)
    y = y.reshape(b, nc * q, h, p)[:, :l]
    return y.to(x.dtype), s.reshape(b, h, p, n).to(x.dtype)
