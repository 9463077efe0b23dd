"""Gated delta rule reference: chunked (WY form) vs recurrent vs single-step vs matrix form."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from megacpp.ops.delta_rule import gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step
from ops_testutil import NumelRecorder, randint, rel_err

F64 = torch.float64


def make_inputs(b, l, h, dk, dv, *, dtype=F64, with_init=True, g_scale=1.0):
    q = torch.randn(b, l, h, dk, dtype=dtype)
    # L2-normalised keys, as Gated DeltaNet uses them: keeps I - beta k k^T a contraction.
    k = F.normalize(torch.randn(b, l, h, dk, dtype=dtype), dim=-1)
    v = torch.randn(b, l, h, dv, dtype=dtype)
    g = F.logsigmoid(torch.randn(b, l, h, dtype=dtype)) * g_scale
    beta = torch.rand(b, l, h, dtype=dtype) * 0.98 + 0.01
    s0 = torch.randn(b, h, dk, dv, dtype=dtype) if with_init else None
    return q, k, v, g, beta, s0


def draw_len(gen, chunk, layout):
    if layout == "ragged":
        return chunk * randint(gen, 1, 3) + randint(gen, 1, max(chunk - 1, 1))
    if layout == "exact":
        return chunk * randint(gen, 1, 3)
    return randint(gen, 1, chunk)


@pytest.mark.parametrize("layout", ["ragged", "exact", "short"])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("heads", [1, 3])
def test_chunked_matches_recurrent_f64(gen, layout, with_init, heads):
    chunk = randint(gen, 2, 8)
    l = draw_len(gen, chunk, layout)
    b, dk, dv = randint(gen, 1, 2), randint(gen, 1, 6), randint(gen, 1, 6)
    q, k, v, g, beta, s0 = make_inputs(b, l, heads, dk, dv, with_init=with_init)
    o, s = gated_delta_rule(q, k, v, g, beta, s0, chunk_size=chunk)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    assert o.shape == (b, l, heads, dv) and o.dtype == F64
    assert s.shape == (b, heads, dk, dv) and s.dtype == F64
    assert rel_err(o, o_ref) < 1e-10
    assert rel_err(s, s_ref) < 1e-10


def test_unnormalised_keys_and_custom_scale(gen):
    # Nothing in the chunked algebra assumes |k| = 1; keep beta |k|^2 < 2 so it stays stable.
    b, l, h, dk, dv = 2, 29, 2, 5, 3
    q, k, v, g, beta, s0 = make_inputs(b, l, h, dk, dv)
    k = k * (0.5 + torch.rand(b, l, h, 1, dtype=F64))
    o, s = gated_delta_rule(q, k, v, g, beta, s0, chunk_size=8, scale=0.3)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, s0, scale=0.3)
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    # Default scale is dk ** -0.5 applied to q.
    o_def, _ = gated_delta_rule(q, k, v, g, beta, s0, chunk_size=8)
    o_exp, _ = gated_delta_rule(q * dk**-0.5, k, v, g, beta, s0, chunk_size=8, scale=1.0)
    assert rel_err(o_def, o_exp) < 1e-12


def test_recurrent_matches_matrix_form(gen):
    # Independent ground truth, straight from S_t = alpha (I - beta k k^T) S_{t-1} + beta k v^T.
    b, l, h, dk, dv = 2, randint(gen, 1, 12), 2, 4, 3
    q, k, v, g, beta, s0 = make_inputs(b, l, h, dk, dv)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    eye = torch.eye(dk, dtype=F64)
    o = torch.empty_like(o_ref)
    s_fin = torch.empty_like(s_ref)
    for bi, hi in itertools.product(range(b), range(h)):
        S = s0[bi, hi].clone()
        for t in range(l):
            kt, bt = k[bi, t, hi], beta[bi, t, hi]
            S = torch.exp(g[bi, t, hi]) * (eye - bt * torch.outer(kt, kt)) @ S + bt * torch.outer(kt, v[bi, t, hi])
            o[bi, t, hi] = S.T @ q[bi, t, hi] * dk**-0.5
        s_fin[bi, hi] = S
    assert rel_err(o_ref, o) < 1e-12
    assert rel_err(s_ref, s_fin) < 1e-12


def test_step_chain_matches_chunked(gen):
    b, l, h, dk, dv = 2, randint(gen, 5, 25), 3, 4, 5
    q, k, v, g, beta, s0 = make_inputs(b, l, h, dk, dv)
    o, s = gated_delta_rule(q, k, v, g, beta, s0, chunk_size=randint(gen, 2, 8))
    state, outs = s0, []
    for t in range(l):
        o_t, state = gated_delta_rule_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t])
        assert o_t.shape == (b, h, dv) and state.shape == (b, h, dk, dv)
        outs.append(o_t)
    assert rel_err(torch.stack(outs, 1), o) < 1e-10
    assert rel_err(state, s) < 1e-10


def test_state_passing_across_calls(gen):
    b, l, h, dk, dv = 2, randint(gen, 4, 40), 2, 3, 4
    cut = randint(gen, 1, l - 1)
    chunk = randint(gen, 2, 9)
    q, k, v, g, beta, s0 = make_inputs(b, l, h, dk, dv)
    o, s = gated_delta_rule(q, k, v, g, beta, s0, chunk_size=chunk)
    head = [t[:, :cut] for t in (q, k, v, g, beta)]
    tail = [t[:, cut:] for t in (q, k, v, g, beta)]
    o1, s1 = gated_delta_rule(*head, s0, chunk_size=chunk)
    o2, s2 = gated_delta_rule(*tail, s1, chunk_size=chunk)
    assert rel_err(torch.cat([o1, o2], 1), o) < 1e-10
    assert rel_err(s2, s) < 1e-10


def test_strong_decay_and_sharp_beta_are_stable(gen):
    b, l, h, dk, dv = 1, 70, 2, 4, 4
    q, k, v, g, beta, s0 = make_inputs(b, l, h, dk, dv, g_scale=40.0)
    beta = beta.clamp(0.9, 0.999)
    o, s = gated_delta_rule(q, k, v, g, beta, s0, chunk_size=32)
    o_ref, s_ref = gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert rel_err(o, o_ref) < 1e-10 and rel_err(s, s_ref) < 1e-10
    o32, _ = gated_delta_rule(*(t.float() for t in (q, k, v, g, beta, s0)), chunk_size=32)
    assert torch.isfinite(o32).all()


@pytest.mark.parametrize("with_init", [False, True])
def test_gradcheck_chunked(gen, with_init):
    q, k, v, g, beta, s0 = make_inputs(1, 5, 2, 3, 2, with_init=with_init)
    inputs = [t.requires_grad_() for t in (q, k, v, g, beta) + ((s0,) if with_init else ())]

    def f(q, k, v, g, beta, s0=None):
        return gated_delta_rule(q, k, v, g, beta, s0, chunk_size=2)

    assert torch.autograd.gradcheck(f, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradients_match_recurrent(gen):
    b, l, h, dk, dv = 2, randint(gen, 10, 30), 2, 4, 3
    inputs = [t.requires_grad_() for t in make_inputs(b, l, h, dk, dv)]
    go, gs = torch.randn(b, l, h, dv, dtype=F64), torch.randn(b, h, dk, dv, dtype=F64)
    chunk = randint(gen, 2, 8)

    def grads(fn, **kw):
        o, s = fn(*inputs, **kw)
        return torch.autograd.grad((o * go).sum() + (s * gs).sum(), inputs)

    for a, r in zip(grads(gated_delta_rule, chunk_size=chunk), grads(gated_delta_rule_recurrent)):
        assert rel_err(a, r) < 1e-10


def test_float32_and_bf16(gen):
    b, l, h, dk, dv = 2, 50, 2, 16, 8
    inputs = make_inputs(b, l, h, dk, dv)
    o_ref, s_ref = gated_delta_rule_recurrent(*inputs)
    o, s = gated_delta_rule(*(t.float() for t in inputs), chunk_size=16)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert rel_err(o, o_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4

    bf = [t.bfloat16() for t in inputs]
    o_ref, s_ref = gated_delta_rule_recurrent(*(t.double() for t in bf))
    o, s = gated_delta_rule(*bf, chunk_size=16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.bfloat16
    assert rel_err(o, o_ref) < 1e-2 and rel_err(s, s_ref) < 1e-2


def test_memory_linear_in_seqlen(gen):
    b, l, h, dk, dv, chunk = 1, 256, 2, 4, 4, 16
    inputs = make_inputs(b, l, h, dk, dv)
    with NumelRecorder() as rec:
        gated_delta_rule(*inputs, chunk_size=chunk)
    bound = b * h * l * max(chunk, dk + dv)
    assert bound * 8 <= b * h * l * l
    assert rec.max_numel <= bound, rec.biggest


def test_zero_length_and_bad_shapes():
    q, k, v, g, beta, s0 = make_inputs(1, 0, 2, 3, 4)
    o, s = gated_delta_rule(q, k, v, g, beta, s0)
    assert o.shape == (1, 0, 2, 4) and torch.equal(s, s0)
    q, k, v, g, beta, s0 = make_inputs(1, 4, 2, 3, 4)
    with pytest.raises(ValueError, match="initial_state"):
        gated_delta_rule(q, k, v, g, beta, s0[..., :2])
    with pytest.raises(ValueError, match="q and k"):
        gated_delta_rule(q, k[..., :2], v, g, beta)
    with pytest.raises(ValueError, match="chunk_size"):
        gated_delta_rule(q, k, v, g, beta, chunk_size=0)
