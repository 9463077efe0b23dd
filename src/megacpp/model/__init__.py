"""The network: HybridLM and its blocks (see hybrid.py for the forward contract)."""
from .hybrid import DecodeCache, HybridLM, ModelOutput

__all__ = ["DecodeCache", "HybridLM", "ModelOutput"]
