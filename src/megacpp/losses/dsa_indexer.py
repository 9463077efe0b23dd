"""DSA indexer loss (DeepSeek-V3.2): KL(main attention || indexer distribution).

The target is the main attention at the selected keys, summed over heads
and L1-normalised (detached: only the indexer learns from this loss); the
prediction is softmax of the indexer scores over the same keys. Computed on
the selected set only, so no (seq, seq) tensor is needed. In the dense
warm-up stage the main attention saw every key, but the loss still compares
the two distributions over the indexer's top-k set.
"""
from __future__ import annotations

import torch


def indexer_kl_loss(stats) -> torch.Tensor:
    """stats: model.attention.DSAStats. Mean KL over query positions that have keys."""
    scores = stats.index_scores.float()
    target = stats.attn_target.float()
    valid = stats.indices >= 0
    logp = torch.log_softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    logp = logp.masked_fill(~valid, 0.0)
    kl = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp),
                     torch.zeros_like(target)).sum(-1)
    rows = valid.any(-1)
    return (kl * rows).sum() / rows.sum().clamp_min(1)
