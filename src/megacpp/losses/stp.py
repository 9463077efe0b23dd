"""Semantic Tube Prediction (STP): a straightness prior on hidden trajectories.

Huang, LeCun, Balestriero, arXiv 2602.22617: a token trajectory in hidden
space is locally straight (the geodesic hypothesis). Two forms (FACTS §2):

- "curvature" (MegaCpp's): ordered positions s < r < t in one document,
  d1 = h_r - h_s, d2 = h_t - h_r, loss = 1 - cos(d1, d2).
- "span" (the paper's, without the optional predictor): a span [s, t)
  inside a document with context a < s and b >= t around it;
  before = h_s - h_a, after = h_b - h_t, span = h_t - h_s,
  loss = 1 - cos(before + after, span).

Positions are drawn with a generator seeded by (seed, step), so a resumed run
draws the same triples. Draws that cross a document boundary are dropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _draw(batch: int, seqlen: int, n: int, k: int, seed: int, device) -> torch.Tensor:
    """n sorted, distinct positions-per-draw (k of them) per row: (batch, n, k)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    # k distinct positions: take the first k of a random permutation, sorted
    keys = torch.rand(batch, n, seqlen, generator=g)
    pos = keys.topk(k, dim=-1).indices.sort(dim=-1).values
    return pos.to(device)


def stp_loss(hidden: torch.Tensor, doc_ids: torch.Tensor | None, n_spans: int, form: str,
             seed: int) -> torch.Tensor:
    """hidden (batch, seqlen, d); doc_ids (batch, seqlen) or None. Returns a scalar."""
    b, t, d = hidden.shape
    k = 3 if form == "curvature" else 4
    if t < k:
        return hidden.sum() * 0.0
    pos = _draw(b, t, n_spans, k, seed, hidden.device)                      # (b, n, k)
    rows = torch.arange(b, device=hidden.device)[:, None, None].expand_as(pos)
    h = hidden[rows, pos].float()                                           # (b, n, k, d)
    if doc_ids is not None:
        docs = doc_ids[rows, pos]
        valid = (docs == docs[..., :1]).all(dim=-1)                         # same document
    else:
        valid = torch.ones(b, n_spans, dtype=torch.bool, device=hidden.device)
    if form == "curvature":
        d1 = h[..., 1, :] - h[..., 0, :]
        d2 = h[..., 2, :] - h[..., 1, :]
        cos = F.cosine_similarity(d1, d2, dim=-1, eps=1e-6)
    else:
        before = h[..., 1, :] - h[..., 0, :]
        span = h[..., 2, :] - h[..., 1, :]
        after = h[..., 3, :] - h[..., 2, :]
        cos = F.cosine_similarity(before + after, span, dim=-1, eps=1e-6)
    w = valid.to(cos.dtype)
    return ((1.0 - cos) * w).sum() / w.sum().clamp_min(1.0)


def stp_over_layers(collected: dict[int, torch.Tensor], doc_ids, n_spans: int, form: str,
                    seed: int) -> torch.Tensor:
    """Average of stp_loss over the collected layers (same draws for each layer)."""
    losses = [stp_loss(h, doc_ids, n_spans, form, seed) for _, h in sorted(collected.items())]
    return torch.stack(losses).mean()
