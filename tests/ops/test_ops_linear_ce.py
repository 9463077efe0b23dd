"""Chunked linear cross-entropy vs the logits-materialising baseline."""
from __future__ import annotations

import pytest
import torch

from megacpp.ops.linear_ce import linear_cross_entropy, linear_cross_entropy_naive
from ops_testutil import NumelRecorder, randint, rel_err

F64 = torch.float64


def make_inputs(gen, n, d, v, *, dtype=F64, ignore_frac=0.25, ignore_index=-100):
    hidden = torch.randn(n, d, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, d, dtype=dtype) * d**-0.5).requires_grad_()
    target = torch.randint(0, v, (n,))
    target[torch.rand(n) < ignore_frac] = ignore_index
    return hidden, weight, target


def upstream(loss, reduction):
    """Random upstream gradient: per token for "none", a random scalar otherwise."""
    if reduction == "none":
        go = torch.randn_like(loss)
        go[::3] = 0.0  # exact zeros must zero those tokens' contribution
        return go
    return torch.randn((), dtype=loss.dtype)


def loss_and_grads(fn, hidden, weight, target, go, **kw):
    loss = fn(hidden, weight, target, **kw)
    gh, gw = torch.autograd.grad(loss, (hidden, weight), go)
    return loss, gh, gw


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk", ["one", "ragged", "big"])
def test_matches_naive(gen, reduction, dtype, tol, chunk):
    n, d, v = randint(gen, 5, 60), randint(gen, 1, 16), randint(gen, 2, 50)
    chunk_size = {"one": 1, "ragged": randint(gen, 2, 7), "big": n + 3}[chunk]
    hidden, weight, target = make_inputs(gen, n, d, v, dtype=dtype)
    ref = linear_cross_entropy_naive(hidden, weight, target, reduction=reduction)
    go = upstream(ref, reduction)
    got = loss_and_grads(linear_cross_entropy, hidden, weight, target, go, reduction=reduction, chunk_size=chunk_size)
    ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, target, go, reduction=reduction)
    assert got[0].shape == ref[0].shape and got[0].dtype == ref[0].dtype
    for a, r in zip(got, ref):
        assert a.dtype == r.dtype
        assert rel_err(a, r) < tol


def test_none_per_token_gradients_are_exact(gen):
    # The classic bug: treating grad_output of reduction="none" as a scalar.
    # Check each token's gradient on its own with a one-hot upstream grad,
    # against autograd through an explicit log_softmax of that single row.
    n, d, v = 11, 6, 9
    hidden, weight, target = make_inputs(gen, n, d, v)
    loss = linear_cross_entropy(hidden, weight, target, reduction="none", chunk_size=4)
    for i in range(n):
        go = torch.zeros(n, dtype=F64)
        go[i] = 1.0
        gh, gw = torch.autograd.grad(loss, (hidden, weight), go, retain_graph=True)
        if target[i] == -100:
            assert loss[i] == 0 and not gh.any() and not gw.any()
            continue
        row = -torch.log_softmax(hidden[i] @ weight.T, dim=-1)[target[i]]
        rh, rw = torch.autograd.grad(row, (hidden, weight))
        assert rel_err(loss[i], row) < 1e-12
        assert rel_err(gh, rh) < 1e-12 and rel_err(gw, rw) < 1e-12
    # And a dense random combination equals the same combination of per-token grads.
    go = torch.randn(n, dtype=F64)
    gh, gw = torch.autograd.grad(loss, (hidden, weight), go)
    rh, rw = torch.autograd.grad((linear_cross_entropy_naive(hidden, weight, target, reduction="none") * go).sum(), (hidden, weight))
    assert rel_err(gh, rh) < 1e-12 and rel_err(gw, rw) < 1e-12


def test_none_ignores_nonfinite_upstream_at_ignored_tokens(gen):
    hidden, weight, target = make_inputs(gen, 8, 4, 5, ignore_frac=0.0)
    target[[1, 5]] = -100
    go = torch.randn(8, dtype=F64)
    go[[1, 5]] = float("nan")
    gh, gw = torch.autograd.grad(linear_cross_entropy(hidden, weight, target, reduction="none", chunk_size=3), (hidden, weight), go)
    assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
    assert not gh[[1, 5]].any()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(gen, reduction):
    hidden, weight, target = make_inputs(gen, 7, 3, 5)
    target[2] = -100

    def f(h, w):
        return linear_cross_entropy(h, w, target, reduction=reduction, chunk_size=3)

    assert torch.autograd.gradcheck(f, (hidden, weight), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_custom_ignore_index(gen):
    hidden, weight, target = make_inputs(gen, 20, 5, 7, ignore_frac=0.0)
    target[::4] = 3  # a real class id used as ignore_index
    for reduction in ("mean", "sum", "none"):
        a = linear_cross_entropy(hidden, weight, target, ignore_index=3, reduction=reduction, chunk_size=6)
        r = linear_cross_entropy_naive(hidden, weight, target, ignore_index=3, reduction=reduction)
        assert rel_err(a, r) < 1e-12


def test_all_ignored_matches_torch(gen):
    hidden, weight, target = make_inputs(gen, 6, 4, 5)
    target[:] = -100
    for reduction in ("mean", "sum", "none"):
        got = loss_and_grads(linear_cross_entropy, hidden, weight, target, upstream(
            linear_cross_entropy_naive(hidden, weight, target, reduction=reduction), reduction), reduction=reduction, chunk_size=4)
        if reduction == "mean":
            assert torch.isnan(got[0])  # 0/0, like F.cross_entropy
        else:
            assert not got[0].any()
        assert not got[1].any() and not got[2].any()


def test_partial_requires_grad(gen):
    hidden, weight, target = make_inputs(gen, 13, 4, 6)
    for reduction in ("mean", "none"):
        w_frozen = weight.detach()
        loss = linear_cross_entropy(hidden, w_frozen, target, reduction=reduction, chunk_size=5)
        (gh,) = torch.autograd.grad(loss.sum(), hidden)
        (rh,) = torch.autograd.grad(linear_cross_entropy_naive(hidden, w_frozen, target, reduction=reduction).sum(), hidden)
        assert rel_err(gh, rh) < 1e-12
        h_frozen = hidden.detach()
        loss = linear_cross_entropy(h_frozen, weight, target, reduction=reduction, chunk_size=5)
        (gw,) = torch.autograd.grad(loss.sum(), weight)
        (rw,) = torch.autograd.grad(linear_cross_entropy_naive(h_frozen, weight, target, reduction=reduction).sum(), weight)
        assert rel_err(gw, rw) < 1e-12
    with torch.no_grad():
        a = linear_cross_entropy(hidden, weight, target, chunk_size=5)
    assert rel_err(a, linear_cross_entropy_naive(hidden, weight, target)) < 1e-12


def test_bf16_inputs(gen):
    hidden, weight, target = make_inputs(gen, 40, 16, 30, dtype=torch.bfloat16)
    for reduction in ("mean", "sum", "none"):
        ref = linear_cross_entropy_naive(hidden, weight, target, reduction=reduction)
        go = upstream(ref, reduction)
        got = loss_and_grads(linear_cross_entropy, hidden, weight, target, go, reduction=reduction, chunk_size=16)
        ref = loss_and_grads(linear_cross_entropy_naive, hidden, weight, target, go, reduction=reduction)
        assert got[0].dtype == torch.float32  # logits and loss in float32
        assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16
        assert rel_err(got[0], ref[0]) < 1e-5
        assert rel_err(got[1], ref[1]) < 1e-2 and rel_err(got[2], ref[2]) < 1e-2


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_never_holds_more_than_chunk_logits(gen, reduction):
    n, d, v, chunk = 512, 8, 128, 32
    hidden, weight, target = make_inputs(gen, n, d, v, dtype=torch.float32)
    bound = max(chunk * v, n * d, v * d)  # one chunk of logits, or an input-sized buffer
    assert bound * 8 <= n * v

    with NumelRecorder() as fwd:
        loss = linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk)
    go = upstream(loss, reduction)
    with NumelRecorder() as bwd:
        loss.backward(go)
    assert fwd.max_numel <= bound, fwd.biggest
    assert bwd.ops > 0, "backward ran outside the recorder"
    assert bwd.max_numel <= bound, bwd.biggest
    assert fwd.max_numel >= chunk * v  # a full logits chunk was seen, so the recorder works

    # The recorder does catch the materialising baseline.
    with NumelRecorder() as naive:
        linear_cross_entropy_naive(hidden, weight, target, reduction=reduction)
    assert naive.max_numel >= n * v


def test_bad_inputs():
    h, w = torch.randn(4, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="target values"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="target values"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, -1, 2]))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 2]), reduction="avg")
    with pytest.raises(ValueError, match="hidden"):
        linear_cross_entropy(h, torch.randn(5, 4), torch.tensor([0, 1, 2, 2]))
    with pytest.raises(ValueError, match="int64"):
        linear_cross_entropy(h, w, torch.tensor([0, 1, 2, 2], dtype=torch.int32))


def test_chunked_under_bf16_autocast_matches_naive():
    """Inside a bf16 autocast region (how the trainer calls it) the op keeps its own dtypes."""
    torch.manual_seed(0)
    h0 = torch.randn(300, 32, dtype=torch.bfloat16)
    w0 = (torch.randn(200, 32) * 0.2).to(torch.bfloat16)
    tgt = torch.randint(0, 200, (300,))
    outs = []
    for fn in (linear_cross_entropy, linear_cross_entropy_naive):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(h, w, tgt, reduction="sum", chunk_size=64)
        loss.backward()
        outs.append((loss.float(), h.grad.float(), w.grad.float()))
    (l0, gh0, gw0), (l1, gh1, gw1) = outs
    assert torch.allclose(l0, l1, rtol=1e-3)
    assert (gh0 - gh1).norm() / gh1.norm() < 2e-2
    assert (gw0 - gw1).norm() / gw1.norm() < 2e-2


def test_no_grad_forms_no_gradients(gen, monkeypatch):
    """Under no_grad (evaluation) the chunked op computes the loss only: no
    softmax-gradient pass, the same loss."""
    from megacpp.ops.linear_ce import reference as R
    hidden, weight, target = make_inputs(gen, 40, 8, 30)
    calls = []
    real = R._chunk_grad
    monkeypatch.setattr(R, "_chunk_grad", lambda *a: (calls.append(1), real(*a))[1])
    with torch.no_grad():
        a = linear_cross_entropy(hidden, weight, target, chunk_size=16)
    assert calls == []
    b = linear_cross_entropy(hidden, weight, target, chunk_size=16)
    assert len(calls) == 3 and torch.equal(a, b.detach())
