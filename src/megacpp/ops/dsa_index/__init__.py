"""DSA lightning-indexer reference ops (chunked top-k and naive baselines)."""
from .reference import indexer_scores_naive, indexer_topk, indexer_topk_naive

__all__ = ["indexer_topk", "indexer_scores_naive", "indexer_topk_naive"]
