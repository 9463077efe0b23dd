"""megacpp: a PyTorch-native training stack for small hybrid language models over C++."""
from __future__ import annotations

__version__ = "0.1.0"

from .recipe import ModelSpec, Recipe, RunPolicy, load_recipe  # noqa: E402  (no torch)


def build_model(model_spec: ModelSpec):
    """HybridLM built from a ModelSpec only (imports torch lazily)."""
    from .model.hybrid import HybridLM

    return HybridLM(model_spec)


__all__ = ["ModelSpec", "Recipe", "RunPolicy", "build_model", "load_recipe", "__version__"]
