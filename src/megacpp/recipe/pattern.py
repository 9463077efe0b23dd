"""Hybrid layer-pattern grammar: parse once, tile, override, count.

One letter per layer:
  A  attention (GQA or MLA, chosen by model.attention.kind)
  D  attention with DSA sparse key selection (an A variant)
  M  Mamba mixer (version 2 or 3, chosen by model.mamba.version)
  R  recurrent mixer (gated delta rule)
  E  mixture-of-experts feed-forward
  F  dense feed-forward
`|` marks a pipeline-stage boundary and whitespace is ignored. A pattern
shorter than the depth tiles as pattern[i % len(pattern)]; a pattern whose
length equals the depth is taken as is. Overrides replace the letter at a
0-based layer index after tiling and are kept visible in the descriptors.

This module imports no torch: recipes and launcher arguments can be built on
any machine.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError

LETTERS = "ADMREF"
FAMILY = {
    "A": "attention",
    "D": "attention",
    "M": "mamba",
    "R": "recurrent",
    "E": "moe",
    "F": "mlp",
}
# The family letter under which per-family policy (norm seam, activation
# checkpointing) is keyed; D shares A's.
FAMILY_KEY = {"A": "A", "D": "A", "M": "M", "R": "R", "E": "E", "F": "F"}


@dataclass(frozen=True)
class LayerDesc:
    index: int          # 0-based layer index in the model
    letter: str         # one of LETTERS
    family: str         # attention | mamba | recurrent | moe | mlp
    stage: int          # pipeline stage (count of `|` before it)
    overridden: bool    # letter came from an explicit per-layer override


@dataclass(frozen=True)
class ParsedPattern:
    layers: tuple[LayerDesc, ...]
    stage_boundaries: tuple[int, ...]   # layer indices at which a new stage starts

    @property
    def letters(self) -> str:
        return "".join(l.letter for l in self.layers)

    @property
    def depth(self) -> int:
        return len(self.layers)

    def counts(self) -> dict[str, int]:
        """Layers per letter, in LETTERS order, zero counts included."""
        out = {c: 0 for c in LETTERS}
        for l in self.layers:
            out[l.letter] += 1
        return out

    def family_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for l in self.layers:
            out[l.family] = out.get(l.family, 0) + 1
        return out

    def with_stages(self) -> str:
        """The full-length pattern with `|` at stage boundaries."""
        parts = []
        for l in self.layers:
            if l.index in self.stage_boundaries:
                parts.append("|")
            parts.append(l.letter)
        return "".join(parts)


def _clean(pattern: str, field: str) -> tuple[str, list[int]]:
    """Strip whitespace; return letters and the letter offsets where `|` stood."""
    if not isinstance(pattern, str):
        raise RecipeError(f"must be a string of layer letters, got {type(pattern).__name__}", field)
    letters: list[str] = []
    bounds: list[int] = []
    for pos, ch in enumerate(pattern):
        if ch.isspace():
            continue
        if ch == "|":
            if not letters or (bounds and bounds[-1] == len(letters)):
                raise RecipeError(f"empty pipeline stage at character {pos} of {pattern!r}", field)
            bounds.append(len(letters))
            continue
        if ch not in LETTERS:
            raise RecipeError(
                f"unknown layer letter {ch!r} at character {pos} of {pattern!r}; "
                f"allowed: {', '.join(LETTERS)} and '|'", field)
        letters.append(ch)
    if not letters:
        raise RecipeError("pattern has no layer letters", field)
    if bounds and bounds[-1] == len(letters):
        raise RecipeError(f"pattern {pattern!r} ends with '|' (empty pipeline stage)", field)
    return "".join(letters), bounds


def parse_pattern(pattern: str, depth: int, overrides: dict[int, str] | None = None,
                  field: str = "model.pattern") -> ParsedPattern:
    """Parse, tile to `depth`, apply per-layer overrides.

    Stage boundaries (`|`) are only allowed in a full-length pattern: tiling a
    staged pattern would make stage placement ambiguous.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise RecipeError(f"must be a positive integer, got {depth!r}", "model.depth")
    letters, bounds = _clean(pattern, field)
    if len(letters) != depth:
        if bounds:
            raise RecipeError(
                f"a pattern with '|' stage boundaries must be full length "
                f"({len(letters)} letters, depth {depth})", field)
        if len(letters) > depth:
            raise RecipeError(
                f"pattern has {len(letters)} letters, more than depth {depth}", field)
        letters = "".join(letters[i % len(letters)] for i in range(depth))
    overrides = dict(overrides or {})
    out = list(letters)
    for idx, letter in sorted(overrides.items()):
        ofield = f"model.overrides.{idx}"
        if isinstance(idx, bool) or not isinstance(idx, int) or not (0 <= idx < depth):
            raise RecipeError(f"layer index must be in [0, {depth}), got {idx!r}", ofield)
        if not isinstance(letter, str) or len(letter) != 1 or letter not in LETTERS:
            raise RecipeError(f"override must be one of {', '.join(LETTERS)}, got {letter!r}", ofield)
        out[idx] = letter
    stage_of = []
    stage = 0
    bset = set(bounds)
    for i in range(depth):
        if i in bset:
            stage += 1
        stage_of.append(stage)
    layers = tuple(
        LayerDesc(i, c, FAMILY[c], stage_of[i], i in overrides) for i, c in enumerate(out))
    return ParsedPattern(layers, tuple(bounds))
