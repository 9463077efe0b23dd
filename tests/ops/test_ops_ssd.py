"""Mamba-2 SSD reference: chunked vs recurrent vs single-step vs explicit matrix form."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from megacpp.ops.ssd import ssd, ssd_recurrent, ssd_step
from ops_testutil import NumelRecorder, randint, rel_err

F64 = torch.float64


def make_inputs(b, l, h, p, g, n, *, dtype=F64, with_d=True, with_init=True, dt_scale=1.0):
    x = torch.randn(b, l, h, p, dtype=dtype)
    dt = F.softplus(torch.randn(b, l, h, dtype=dtype)) * dt_scale
    A = -torch.rand(h, dtype=dtype) * 2 - 0.05
    B = torch.randn(b, l, g, n, dtype=dtype)
    C = torch.randn(b, l, g, n, dtype=dtype)
    D = torch.randn(h, dtype=dtype) if with_d else None
    s0 = torch.randn(b, h, p, n, dtype=dtype) if with_init else None
    return x, dt, A, B, C, D, s0


def draw_len(gen, chunk, layout):
    if layout == "ragged":  # several chunks plus a partial one
        return chunk * randint(gen, 1, 3) + randint(gen, 1, max(chunk - 1, 1))
    if layout == "exact":
        return chunk * randint(gen, 1, 3)
    return randint(gen, 1, chunk)  # "short": at most one chunk


@pytest.mark.parametrize("layout", ["ragged", "exact", "short"])
@pytest.mark.parametrize("ngroups,heads_per_group", [(1, 1), (1, 3), (2, 2), (3, 1)])
@pytest.mark.parametrize("with_init,with_d", list(itertools.product([False, True], [False, True])))
def test_chunked_matches_recurrent_f64(gen, layout, ngroups, heads_per_group, with_init, with_d):
    chunk = randint(gen, 2, 8)
    l = draw_len(gen, chunk, layout)
    b, p, n = randint(gen, 1, 2), randint(gen, 1, 4), randint(gen, 1, 5)
    h = ngroups * heads_per_group
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, ngroups, n, with_d=with_d, with_init=with_init)
    y, s = ssd(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=s0)
    assert y.shape == x.shape and y.dtype == F64
    assert s.shape == (b, h, p, n) and s.dtype == F64
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10


def test_recurrent_matches_explicit_matrix_form(gen):
    # Independent ground truth: y = (L o C B^T) (dt x) + decay-from-0 * h0 C, with
    # L[t, s] = exp(sum_{r=s+1..t} dt_r A) built by plain loops.
    b, l, h, p, g, n = 2, randint(gen, 1, 9), 4, 3, 2, 3
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n)
    y_ref, _ = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=s0)
    y = torch.zeros_like(x)
    for bi, hi, t in itertools.product(range(b), range(h), range(l)):
        gi = hi // (h // g)
        acc = D[hi] * x[bi, t, hi]
        for s in range(t + 1):
            logdec = sum((dt[bi, r, hi] * A[hi] for r in range(s + 1, t + 1)), torch.zeros((), dtype=F64))
            acc = acc + torch.exp(logdec) * (C[bi, t, gi] @ B[bi, s, gi]) * dt[bi, s, hi] * x[bi, s, hi]
        dec0 = torch.exp(sum((dt[bi, r, hi] * A[hi] for r in range(t + 1)), torch.zeros((), dtype=F64)))
        y[bi, t, hi] = acc + dec0 * (s0[bi, hi] @ C[bi, t, gi])
    assert rel_err(y_ref, y) < 1e-12


def test_step_chain_matches_chunked(gen):
    b, l, h, p, g, n = 2, randint(gen, 5, 20), 4, 3, 2, 4
    chunk = randint(gen, 2, 6)
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n)
    y, s = ssd(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    state, ys = s0, []
    for t in range(l):
        y_t, state = ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D)
        assert y_t.shape == (b, h, p) and state.shape == (b, h, p, n)
        ys.append(y_t)
    assert rel_err(torch.stack(ys, 1), y) < 1e-10
    assert rel_err(state, s) < 1e-10


def test_state_passing_across_calls(gen):
    # Prefill in two pieces == one call: the final state carries everything.
    b, l, h, p, g, n = 2, randint(gen, 4, 30), 2, 2, 1, 3
    cut = randint(gen, 1, l - 1)
    chunk = randint(gen, 2, 7)
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n)
    y, s = ssd(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    y1, s1 = ssd(x[:, :cut], dt[:, :cut], A, B[:, :cut], C[:, :cut], chunk, D=D, initial_state=s0)
    y2, s2 = ssd(x[:, cut:], dt[:, cut:], A, B[:, cut:], C[:, cut:], chunk, D=D, initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-10
    assert rel_err(s2, s) < 1e-10


def test_strong_decay_is_stable(gen):
    # Log decays of ~-50 per step reach ~-1000s within a chunk: exp of
    # cumulative-sum differences would give inf/inf; segsum must not.
    b, l, h, p, g, n = 1, 37, 2, 3, 1, 4
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n, dt_scale=25.0)
    A = A - 1.0
    y, s = ssd(x, dt, A, B, C, 16, D=D, initial_state=s0)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=s0)
    assert torch.isfinite(y).all() and torch.isfinite(s).all()
    assert rel_err(y, y_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10
    # Also in float32, where exp overflows much sooner.
    y32, _ = ssd(*(t.float() if t is not None else None for t in (x, dt, A, B, C)), 16, D=D.float(), initial_state=s0.float())
    assert torch.isfinite(y32).all()


@pytest.mark.parametrize("ngroups", [1, 2])
def test_gradcheck_chunked(gen, ngroups):
    b, l, h, p, n, chunk = 1, 5, 2, 2, 2, 2
    inputs = make_inputs(b, l, h, p, ngroups, n)
    inputs = [t.requires_grad_() for t in inputs]
    x, dt, A, B, C, D, s0 = inputs

    def f(x, dt, A, B, C, D, s0):
        return ssd(x, dt, A, B, C, chunk, D=D, initial_state=s0)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_match_recurrent(gen):
    b, l, h, p, g, n = 2, randint(gen, 10, 30), 4, 3, 2, 4
    chunk = randint(gen, 3, 8)
    inputs = [t.requires_grad_() for t in make_inputs(b, l, h, p, g, n)]
    x, dt, A, B, C, D, s0 = inputs
    gy, gs = torch.randn(b, l, h, p, dtype=F64), torch.randn(b, h, p, n, dtype=F64)

    def grads(fn, *extra):
        y, s = fn(x, dt, A, B, C, *extra, D=D, initial_state=s0)
        return torch.autograd.grad((y * gy).sum() + (s * gs).sum(), inputs)

    for a, r in zip(grads(ssd, chunk), grads(ssd_recurrent)):
        assert rel_err(a, r) < 1e-10


def test_float32_and_bf16(gen):
    b, l, h, p, g, n = 2, 45, 4, 8, 2, 16
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=s0)
    args32 = [t.float() for t in (x, dt, A, B, C)]
    y, s = ssd(*args32, 16, D=D.float(), initial_state=s0.float())
    assert y.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4

    bf = [t.bfloat16() for t in (x, dt, A, B, C, D, s0)]
    y_ref, s_ref = ssd_recurrent(*(t.double() for t in bf[:5]), D=bf[5].double(), initial_state=bf[6].double())
    y, s = ssd(*bf[:5], 16, D=bf[5], initial_state=bf[6])
    assert y.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    # Only the final rounding to bf16 separates them (compute is float32).
    assert rel_err(y, y_ref) < 1e-2 and rel_err(s, s_ref) < 1e-2


def test_memory_linear_in_seqlen(gen):
    b, l, h, p, g, n, chunk = 1, 256, 2, 4, 1, 4, 16
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n)
    with NumelRecorder() as rec:
        ssd(x, dt, A, B, C, chunk, D=D, initial_state=s0)
    bound = b * h * l * max(chunk, p, n)
    assert bound * 8 <= b * h * l * l  # the bound is far below quadratic
    assert rec.max_numel <= bound, rec.biggest


def test_zero_length_and_bad_shapes():
    x, dt, A, B, C, D, s0 = make_inputs(2, 0, 2, 3, 1, 4)
    y, s = ssd(x, dt, A, B, C, 4, D=D, initial_state=s0)
    assert y.shape == x.shape and torch.equal(s, s0)
    x, dt, A, B, C, D, s0 = make_inputs(1, 5, 3, 2, 2, 4)  # 3 heads, 2 groups
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd(x, dt, A, B, C, 4)
    x, dt, A, B, C, D, s0 = make_inputs(1, 5, 2, 2, 1, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, C, 0)
    with pytest.raises(ValueError, match="initial_state"):
        ssd(x, dt, A, B, C, 4, initial_state=s0[..., :3])


# ------------------------------------------------------------ document starts

def random_starts(b, l, gen, frac=0.15):
    starts = torch.rand(b, l, generator=gen) < frac
    starts[:, 0] = True
    return starts


@pytest.mark.parametrize("with_init", [False, True])
def test_starts_chunked_matches_recurrent_and_each_document_alone(gen, with_init):
    b, l, h, p, g, n, chunk = 2, 37, 4, 3, 2, 5, 8
    x, dt, A, B, C, D, s0 = make_inputs(b, l, h, p, g, n, with_init=with_init)
    starts = random_starts(b, l, gen)
    y, s = ssd(x, dt, A, B, C, chunk, D=D, initial_state=s0, starts=starts)
    y_rec, s_rec = ssd_recurrent(x, dt, A, B, C, D=D, initial_state=s0, starts=starts)
    assert rel_err(y, y_rec) < 1e-10 and rel_err(s, s_rec) < 1e-10
    # a start at 0 drops the initial state: each document is the op on it alone
    for r in range(b):
        bounds = starts[r].nonzero().flatten().tolist() + [l]
        for a0, a1 in zip(bounds[:-1], bounds[1:]):
            sl = slice(a0, a1)
            ya, sa = ssd(x[r:r + 1, sl], dt[r:r + 1, sl], A, B[r:r + 1, sl], C[r:r + 1, sl], chunk, D=D)
            assert rel_err(y[r:r + 1, sl], ya) < 1e-10
        assert rel_err(s[r:r + 1], sa) < 1e-10   # the final state is the last document's
    # no starts but position 0: the initial state is dropped and nothing else changes
    only0 = torch.zeros_like(starts)
    only0[:, 0] = True
    assert rel_err(ssd(x, dt, A, B, C, chunk, D=D, initial_state=s0, starts=only0)[0],
                   ssd(x, dt, A, B, C, chunk, D=D)[0]) < 1e-10


def test_starts_gradients_match_recurrent_and_gradcheck(gen):
    b, l, h, p, g, n, chunk = 2, 19, 2, 3, 1, 4, 4
    inputs = [t.requires_grad_() for t in make_inputs(b, l, h, p, g, n)]
    x, dt, A, B, C, D, s0 = inputs
    starts = random_starts(b, l, gen, 0.2)
    gy, gs = torch.randn(b, l, h, p, dtype=F64), torch.randn(b, h, p, n, dtype=F64)

    def grads(fn, *extra):
        y, s = fn(x, dt, A, B, C, *extra, D=D, initial_state=s0, starts=starts)
        return torch.autograd.grad((y * gy).sum() + (s * gs).sum(), inputs)

    for a, r in zip(grads(ssd, chunk), grads(ssd_recurrent)):
        assert rel_err(a, r) < 1e-10
    small = [t.detach()[:1, :6].clone().requires_grad_() if t.dim() > 1 and t.shape[1] == l else t
             for t in inputs[:5]]
    st = starts[:1, :6].clone()
    st[0, 3] = True
    assert torch.autograd.gradcheck(
        lambda x, dt, A, B, C: ssd(x, dt, A, B, C, 2, D=D.detach(), starts=st), tuple(small),
        eps=1e-6, atol=1e-7, rtol=1e-5)


def test_starts_bad_shape_or_dtype():
    x, dt, A, B, C, D, s0 = make_inputs(1, 6, 2, 2, 1, 2)
    with pytest.raises(ValueError, match="starts must be bool"):
        ssd(x, dt, A, B, C, 2, starts=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="starts must be bool"):
        ssd(x, dt, A, B, C, 2, starts=torch.ones(1, 6))
