"""DSA lightning-indexer top-k: chunked vs full-matrix baseline vs a brute-force definition."""
from __future__ import annotations

import itertools

import pytest
import torch

from megacpp.ops.dsa_index import indexer_scores_naive, indexer_topk, indexer_topk_naive
from ops_testutil import NumelRecorder, randint, rel_err

F64 = torch.float64
NEG_INF = float("-inf")


def make_inputs(b, l, h, d, dtype=F64):
    return torch.randn(b, l, h, d, dtype=dtype), torch.randn(b, l, d, dtype=dtype), torch.randn(b, l, h, dtype=dtype)


def make_docs(b, l):
    # Random document boundaries: doc id increments at random positions.
    return (torch.rand(b, l) < 0.2).long().cumsum(dim=1)


def brute_force(q, k, w, topk, causal, doc_ids):
    """Definition, one (query, key) pair at a time; ordering by (-score, key)."""
    b, l, h, _ = q.shape
    idx = torch.full((b, l, topk), -1, dtype=torch.long)
    val = torch.full((b, l, topk), NEG_INF, dtype=F64)
    for bi, t in itertools.product(range(b), range(l)):
        cands = []
        for s in range(l):
            if (causal and s > t) or (doc_ids is not None and doc_ids[bi, s] != doc_ids[bi, t]):
                continue
            score = sum(float(w[bi, t, j]) * max(float(q[bi, t, j] @ k[bi, s]), 0.0) for j in range(h))
            cands.append((-score, s))
        cands.sort()
        for r, (neg, s) in enumerate(cands[:topk]):
            idx[bi, t, r], val[bi, t, r] = s, -neg
    return idx, val


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("docs", [False, True])
def test_matches_naive(gen, causal, docs):
    b, l, h, d = randint(gen, 1, 2), randint(gen, 1, 50), randint(gen, 1, 4), randint(gen, 1, 8)
    topk, chunk = randint(gen, 1, 20), randint(gen, 1, 16)
    q, k, w = make_inputs(b, l, h, d)
    doc_ids = make_docs(b, l) if docs else None
    idx, val = indexer_topk(q, k, w, topk, causal=causal, chunk_size=chunk, doc_ids=doc_ids)
    ref_idx, ref_val = indexer_topk_naive(q, k, w, topk, causal=causal, doc_ids=doc_ids)
    assert idx.shape == (b, l, topk) and idx.dtype == torch.long and val.dtype == F64
    assert torch.equal(idx, ref_idx)
    assert torch.equal(val == NEG_INF, ref_val == NEG_INF)
    finite = val != NEG_INF
    assert torch.allclose(val[finite], ref_val[finite], rtol=1e-12, atol=1e-12)
    # The returned scores are the full-matrix scores at the returned keys.
    full = indexer_scores_naive(q, k, w, causal=causal, doc_ids=doc_ids)
    picked = full.gather(2, idx.clamp(min=0))
    assert torch.allclose(val[finite], picked[finite], rtol=1e-12, atol=1e-12)


def test_naive_matches_definition(gen):
    b, l, h, d = 2, randint(gen, 1, 12), 3, 4
    q, k, w = make_inputs(b, l, h, d)
    doc_ids = make_docs(b, l)
    for causal, docs in itertools.product([True, False], [None, doc_ids]):
        idx, val = indexer_topk_naive(q, k, w, 5, causal=causal, doc_ids=docs)
        b_idx, b_val = brute_force(q, k, w, 5, causal, docs)
        assert torch.equal(idx, b_idx)
        assert torch.allclose(val, b_val, rtol=1e-12, atol=1e-12)


def test_ties_go_to_lower_key_index(gen):
    # Small integers make every score exact, so ties are real ties: both
    # implementations must order them by key index, like the brute force.
    b, l, h, d = 2, 40, 2, 3
    q = torch.randint(-1, 2, (b, l, h, d)).to(F64)
    k = torch.randint(-1, 2, (b, l, d)).to(F64)
    w = torch.randint(1, 3, (b, l, h)).to(F64)
    doc_ids = make_docs(b, l)
    for causal, docs in itertools.product([True, False], [None, doc_ids]):
        b_idx, b_val = brute_force(q, k, w, 12, causal, docs)
        for idx, val in (
            indexer_topk(q, k, w, 12, causal=causal, chunk_size=7, doc_ids=docs),
            indexer_topk_naive(q, k, w, 12, causal=causal, doc_ids=docs),
        ):
            assert torch.equal(idx, b_idx)
            assert torch.equal(val, b_val)
    # Sanity: the inputs did produce ties.
    full = indexer_scores_naive(q, k, w)
    assert full[0, -1].unique().numel() < l


def test_padding_for_early_positions(gen):
    b, l, h, d, topk = 2, 30, 2, 4, 8
    q, k, w = make_inputs(b, l, h, d)
    idx, val = indexer_topk(q, k, w, topk, chunk_size=4)
    for t in range(l):
        n_valid = min(t + 1, topk)
        assert (idx[:, t, n_valid:] == -1).all()
        assert (val[:, t, n_valid:] == NEG_INF).all()
        assert ((idx[:, t, :n_valid] >= 0) & (idx[:, t, :n_valid] <= t)).all()
        assert torch.isfinite(val[:, t, :n_valid]).all()
        if t + 1 <= topk:  # every earlier key is returned exactly once
            assert torch.equal(idx[:, t, :n_valid].sort(dim=-1).values, torch.arange(t + 1).expand(b, -1))
        # Descending order.
        assert (val[:, t, 1:n_valid] <= val[:, t, : n_valid - 1]).all()


def test_topk_larger_than_seqlen(gen):
    q, k, w = make_inputs(1, 5, 2, 3)
    for causal in (True, False):
        idx, val = indexer_topk(q, k, w, 9, causal=causal, chunk_size=2)
        ref_idx, ref_val = indexer_topk_naive(q, k, w, 9, causal=causal)
        assert torch.equal(idx, ref_idx) and torch.equal(val == NEG_INF, ref_val == NEG_INF)
        assert (idx[..., 5:] == -1).all()


def test_doc_mask(gen):
    b, l, h, d, topk = 2, 48, 2, 4, 6
    q, k, w = make_inputs(b, l, h, d)
    doc_ids = make_docs(b, l)
    idx, val = indexer_topk(q, k, w, topk, chunk_size=5, doc_ids=doc_ids)
    for bi, t in itertools.product(range(b), range(l)):
        same = int(((doc_ids[bi, : t + 1] == doc_ids[bi, t])).sum())
        n_valid = min(same, topk)
        keys = idx[bi, t, :n_valid]
        assert (keys <= t).all() and (doc_ids[bi, keys] == doc_ids[bi, t]).all()
        assert (idx[bi, t, n_valid:] == -1).all() and (val[bi, t, n_valid:] == NEG_INF).all()
    # Non-causal with documents: keys may lie ahead, but never in another document.
    idx, _ = indexer_topk(q, k, w, topk, causal=False, chunk_size=5, doc_ids=doc_ids)
    ok = idx >= 0
    src_doc = doc_ids[:, :, None].expand_as(idx)
    key_doc = doc_ids.gather(1, idx.clamp(min=0).flatten(1)).view_as(idx)
    assert (key_doc[ok] == src_doc[ok]).all()
    assert (idx > torch.arange(l)[None, :, None]).any()


def test_low_precision_inputs(gen):
    b, l, h, d = 2, 33, 4, 16
    q, k, w = make_inputs(b, l, h, d)
    for dtype in (torch.float32, torch.bfloat16):
        ql, kl, wl = q.to(dtype), k.to(dtype), w.to(dtype)
        idx, val = indexer_topk(ql, kl, wl, 8, chunk_size=8)
        assert val.dtype == torch.float32
        _, ref_val = indexer_topk_naive(ql.double(), kl.double(), wl.double(), 8)
        finite = ref_val != NEG_INF
        assert torch.equal(val != NEG_INF, finite)
        assert rel_err(val[finite], ref_val[finite]) < 1e-5


@pytest.mark.parametrize("causal", [True, False])
def test_no_quadratic_tensor(gen, causal):
    b, l, h, d, chunk, topk = 2, 256, 4, 16, 32, 16
    q, k, w = make_inputs(b, l, h, d, dtype=torch.float32)
    doc_ids = make_docs(b, l)
    with NumelRecorder() as rec:
        indexer_topk(q, k, w, topk, causal=causal, chunk_size=chunk, doc_ids=doc_ids)
    bound = max(b * chunk * l, q.numel())  # one chunk of scores, or an input
    assert bound * 4 <= b * l * l
    assert rec.max_numel <= bound, rec.biggest
    with NumelRecorder() as naive:
        indexer_topk_naive(q, k, w, topk, causal=causal, doc_ids=doc_ids)
    assert naive.max_numel >= b * h * l * l  # the recorder sees the per-head tensor


def test_bad_inputs():
    q, k, w = make_inputs(1, 4, 2, 3)
    with pytest.raises(ValueError, match="k must be"):
        indexer_topk(q, k[..., :2], w, 2)
    with pytest.raises(ValueError, match="w must be"):
        indexer_topk(q, k, w[..., :1], 2)
    with pytest.raises(ValueError, match="doc_ids"):
        indexer_topk(q, k, w, 2, doc_ids=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="topk"):
        indexer_topk(q, k, w, 0)
