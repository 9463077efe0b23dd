"""Chunked fused linear + cross-entropy reference ops."""
from .reference import linear_cross_entropy, linear_cross_entropy_naive

__all__ = ["linear_cross_entropy", "linear_cross_entropy_naive"]
