"""Native launcher arguments: the whole resolved recipe as `--set` pairs.

Every leaf of the recipe tree is emitted, in the dataclass field order, each
value as a TOML literal, so the list is byte-identical across runs and
machines and `recipe_from_native_args` rebuilds the same recipe (same hash)
from the blank defaults without needing any preset.
"""
from __future__ import annotations

import tomli_w

from ..errors import RecipeError
from .recipe import Recipe, resolve


def _literal(value) -> str:
    text = tomli_w.dumps({"v": value}).strip()
    assert text.startswith("v = ")
    return text[4:]


def _leaves(prefix: str, value, out: list[tuple[str, str]]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _leaves(f"{prefix}.{k}", v, out)
    else:
        # an empty table stays explicit so a base's entries cannot leak in
        out.append((prefix, "{}" if isinstance(value, dict) else _literal(value)))


def native_args(recipe: Recipe) -> list[str]:
    leaves: list[tuple[str, str]] = []
    for top, tree in recipe.to_dict().items():
        _leaves(top, tree, leaves)
    args: list[str] = []
    for key, lit in leaves:
        args += ["--set", f"{key}={lit}"]
    return args


def recipe_from_native_args(args: list[str]) -> Recipe:
    """Inverse of native_args: `--set k=v` pairs over the blank defaults."""
    sets = []
    it = iter(args)
    for a in it:
        if a != "--set":
            raise RecipeError(f"expected --set, got {a!r}", "args", "<args>")
        try:
            sets.append(next(it))
        except StopIteration:
            raise RecipeError("--set without a value", "args", "<args>") from None
    return resolve({}, sets, "<native args>")
