"""Recipe = ModelSpec + RunPolicy, loaded from presets, TOML files and `--set`.

Resolution order: the blank defaults, then `base = "PRESET"` (a file may name
a preset or another recipe file), then the file's own tables, then each
`--set dotted.name=value` in order. The result is validated once; its hash is
the sha256 of the canonical JSON of the resolved tree, so two recipes that
resolve to the same values hash equal however they were written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..errors import RecipeError
from . import io
from .pattern import ParsedPattern, parse_pattern
from .policy import RunPolicy
from .spec import ModelSpec
from .validate import validate

TOP_KEYS = ("base", "model", "policy")


@dataclass(frozen=True)
class Recipe:
    model: ModelSpec
    policy: RunPolicy
    # Where each value came from, for error messages and `describe`; not hashed.
    source: str = field(default="<defaults>", compare=False)

    @cached_property
    def hash(self) -> str:
        return io.canonical_hash({"model": self.model, "policy": self.policy})

    @property
    def short_hash(self) -> str:
        return self.hash[:12]

    @cached_property
    def layers(self) -> ParsedPattern:
        m = self.model
        return parse_pattern(m.pattern, m.depth, m.overrides)

    def to_dict(self) -> dict:
        return {"model": io.to_dict(self.model), "policy": io.to_dict(self.policy)}

    def to_toml(self) -> str:
        """The fully resolved recipe as TOML; loading it gives the same hash."""
        return io.dumps_toml(self.to_dict())

    def with_overrides(self, sets: list[str]) -> "Recipe":
        return resolve(self.to_dict(), sets, self.source)


def _from_tree(tree: dict, source: str, lines: dict[str, int] | None = None,
               set_keys: tuple[str, ...] = ()) -> Recipe:
    """Typed + validated recipe from a resolved plain tree; errors get file:line."""
    try:
        for key in tree:
            if key not in ("model", "policy"):
                raise RecipeError(f"unknown top-level key; allowed: {', '.join(TOP_KEYS)}", key)
        model = io.from_dict(ModelSpec, tree.get("model", {}), "model")
        policy = io.from_dict(RunPolicy, tree.get("policy", {}), "policy")
        validate(model, policy)
    except RecipeError as e:
        if e.file:
            raise
        for key in set_keys:
            if e.field == key or e.field.startswith(key + ".") or key.startswith(e.field + "."):
                raise RecipeError(e.reason, e.field, "--set") from None
        line = io.line_of(lines, e.field) if lines else None
        raise RecipeError(e.reason, e.field, source, line) from None
    return Recipe(model, policy, source)


def resolve(tree: dict, sets: list[str] | None, source: str,
            lines: dict[str, int] | None = None) -> Recipe:
    for item in sets or []:
        key, value = io.parse_set(item)
        root = key.split(".", 1)[0]
        if root not in ("model", "policy"):
            raise RecipeError("--set names must start with model. or policy.", key, "--set")
        tree = io.set_dotted(tree, key, value)
        # an error in a --set value names --set, not the file
        try:
            _check_set(tree, key)
        except RecipeError as e:
            raise RecipeError(e.reason, e.field, "--set") from None
    keys = tuple(io.parse_set(item)[0] for item in sets or [])
    return _from_tree(tree, source, lines, keys)


def _check_set(tree: dict, key: str) -> None:
    """Type-check the tree once a --set has been applied, to blame the override."""
    try:
        io.from_dict(ModelSpec, tree.get("model", {}), "model")
        io.from_dict(RunPolicy, tree.get("policy", {}), "policy")
    except RecipeError as e:
        if e.field == key or e.field.startswith(key + ".") or key.startswith(e.field):
            raise


def _tree_of_file(path: Path, seen: tuple[str, ...]) -> tuple[dict, dict[str, int]]:
    from . import presets

    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read recipe file: {e.strerror}", "", file) from None
    except UnicodeDecodeError:
        raise RecipeError("recipe file is not UTF-8 text", "", file) from None
    data = io.loads_toml(text, file)
    lines = io.key_lines(text)
    for key in data:
        if key not in TOP_KEYS:
            raise RecipeError(f"unknown top-level key; allowed: {', '.join(TOP_KEYS)}",
                              key, file, io.line_of(lines, key))
    base_tree: dict = {}
    if "base" in data:
        base = data.pop("base")
        if not isinstance(base, str) or not base:
            raise RecipeError("must name a preset or a recipe file", "base", file,
                              io.line_of(lines, "base"))
        if base in seen:
            raise RecipeError(f"circular base chain: {' -> '.join(seen + (base,))}", "base", file,
                              io.line_of(lines, "base"))
        if base in presets.PRESETS:
            base_tree = presets.preset_tree(base)
        else:
            bpath = (path.parent / base) if not os.path.isabs(base) else Path(base)
            if not bpath.is_file():
                raise RecipeError(f"{base!r} is neither a preset ({', '.join(presets.PRESETS)}) "
                                  f"nor a file", "base", file, io.line_of(lines, "base"))
            base_tree, _ = _tree_of_file(bpath, seen + (base,))
    for key in ("model", "policy"):
        if key in data and not isinstance(data[key], dict):
            raise RecipeError("must be a table", key, file, io.line_of(lines, key))
    return io.deep_merge(base_tree, data), lines


def load_recipe(name_or_path: str | os.PathLike, sets: list[str] | None = None) -> Recipe:
    """A preset name or a TOML path, with optional `--set` overrides, validated."""
    from . import presets

    name = str(name_or_path)
    if name in presets.PRESETS and not Path(name).is_file():
        return resolve(presets.preset_tree(name), sets, f"preset:{name}")
    path = Path(name)
    if not path.is_file():
        if path.suffix != ".toml":
            raise RecipeError(f"no preset or file named {name!r}; presets: "
                              f"{', '.join(presets.PRESETS)}", "recipe", name)
        raise RecipeError("recipe file not found", "recipe", name)
    tree, lines = _tree_of_file(path, (name,))
    return resolve(tree, sets, str(path), lines)


def loads_recipe(text: str, source: str = "<string>") -> Recipe:
    """A recipe from TOML text (no `base` resolution relative to a directory)."""
    from . import presets

    data = io.loads_toml(text, source)
    lines = io.key_lines(text)
    base = data.pop("base", None)
    tree = presets.preset_tree(base) if isinstance(base, str) and base in presets.PRESETS else {}
    if base is not None and not tree:
        raise RecipeError(f"unknown preset {base!r}", "base", source, io.line_of(lines, "base"))
    return resolve(io.deep_merge(tree, data), None, source, lines)
