"""Reference for the DeepSeek sparse-attention (DSA) lightning indexer.

    q (batch, seqlen, index_heads, d); k (batch, seqlen, d); w (batch, seqlen, index_heads)
    score[b, t, s] = sum_j w[b, t, j] * relu(q[b, t, j] . k[b, s])

Key s is valid for query t when s <= t (if causal) and, given doc_ids
(batch, seqlen), when doc_ids[b, s] == doc_ids[b, t]. Invalid keys score
-inf. Scores are computed in float32 (float64 for float64 inputs).

`indexer_topk` returns, per query, the topk valid keys in descending score
order, ties going to the lower key index; slots beyond the number of valid
keys hold index -1 and score -inf. It runs chunk_size queries at a time and
accumulates heads into one (batch, chunk, keys) buffer, so neither a
(batch, seqlen, seqlen) nor a per-head score tensor ever exists.
"""
from __future__ import annotations

import torch

from .._common import compute_dtype


def _check(q, k, w, doc_ids):
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, seqlen, index_heads, d), got {tuple(q.shape)}")
    b, l, h, d = q.shape
    if k.shape != (b, l, d):
        raise ValueError(f"k must be {(b, l, d)}, got {tuple(k.shape)}")
    if w.shape != (b, l, h):
        raise ValueError(f"w must be {(b, l, h)}, got {tuple(w.shape)}")
    if doc_ids is not None and doc_ids.shape != (b, l):
        raise ValueError(f"doc_ids must be {(b, l)}, got {tuple(doc_ids.shape)}")
    return b, l, h, d


def _valid(t0, t1, nk, causal, doc_ids, device):
    """(1 or batch, t1 - t0, nk) bool mask of keys each query may see."""
    t = torch.arange(t0, t1, device=device)[:, None]
    s = torch.arange(nk, device=device)[None, :]
    valid = (s <= t) if causal else torch.ones(t1 - t0, nk, dtype=torch.bool, device=device)
    valid = valid[None]
    if doc_ids is not None:
        valid = valid & (doc_ids[:, t0:t1, None] == doc_ids[:, None, :nk])
    return valid


def _select(scores, topk):
    """Top-k of the last dim: descending, ties to the lower index, -1 / -inf padding."""
    nk = scores.shape[-1]
    if nk < topk:
        scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], topk - nk), float("-inf"))], dim=-1)
    # A stable descending sort keeps equal scores in index order; torch.topk
    # makes no such promise, so it could pick different keys among ties.
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :topk], idx[..., :topk]
    idx = idx.masked_fill(vals == float("-inf"), -1)
    return idx, vals


def indexer_topk(q, k, w, topk, causal=True, chunk_size=128, doc_ids=None):
    """Top-k keys per query by indexer score, chunk_size queries at a time.

    Returns (indices (batch, seqlen, topk) int64, scores (batch, seqlen, topk)).
    """
    b, l, h, d = _check(q, k, w, doc_ids)
    if topk < 1 or chunk_size < 1:
        raise ValueError(f"topk and chunk_size must be >= 1, got {topk} and {chunk_size}")
    cdt = compute_dtype(q, k, w)
    kc = k.to(cdt)
    indices = torch.full((b, l, topk), -1, dtype=torch.long, device=q.device)
    scores = torch.full((b, l, topk), float("-inf"), dtype=cdt, device=q.device)
    for t0 in range(0, l, chunk_size):
        t1 = min(t0 + chunk_size, l)
        # Causal queries in [t0, t1) never see keys at or past t1.
        nk = t1 if causal else l
        keys_t = kc[:, :nk].transpose(1, 2)  # (b, d, nk)
        qs = q[:, t0:t1].to(cdt)
        ws = w[:, t0:t1].to(cdt)
        acc = torch.zeros(b, t1 - t0, nk, dtype=cdt, device=q.device)
        for j in range(h):
            part = torch.bmm(qs[:, :, j], keys_t)
            acc.add_(part.relu_().mul_(ws[:, :, j, None]))
            del part
        acc.masked_fill_(~_valid(t0, t1, nk, causal, doc_ids, q.device), float("-inf"))
        indices[:, t0:t1], scores[:, t0:t1] = _select(acc, topk)
        del acc
    return indices, scores


def indexer_scores_naive(q, k, w, causal=True, doc_ids=None):
    """Full (batch, seqlen, seqlen) score matrix, -inf at masked keys (test baseline)."""
    b, l, h, d = _check(q, k, w, doc_ids)
    cdt = compute_dtype(q, k, w)
    per_head = torch.einsum("bthd,bsd->bths", q.to(cdt), k.to(cdt)).relu()
    scores = (per_head * w.to(cdt)[..., None]).sum(dim=2)
    return scores.masked_fill(~_valid(0, l, l, causal, doc_ids, q.device), float("-inf"))


def indexer_topk_naive(q, k, w, topk, causal=True, doc_ids=None):
    """`indexer_topk` computed from the full score matrix (test baseline)."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    return _select(indexer_scores_naive(q, k, w, causal=causal, doc_ids=doc_ids), topk)
