"""Recipes: the explicit, hashable description of a model and its run (no torch)."""
from .pattern import LETTERS, LayerDesc, ParsedPattern, parse_pattern
from .policy import RunPolicy
from .recipe import Recipe, load_recipe, loads_recipe
from .spec import ModelSpec

__all__ = ["LETTERS", "LayerDesc", "ModelSpec", "ParsedPattern", "Recipe", "RunPolicy",
           "load_recipe", "loads_recipe", "parse_pattern"]
