"""Pattern grammar: tiling, counts, overrides, stages, errors (property-based where it fits)."""
import pytest
from hypothesis import given, settings, strategies as st

from megacpp.errors import RecipeError
from megacpp.recipe.pattern import LETTERS, parse_pattern

letters = st.text(alphabet=LETTERS, min_size=1, max_size=20)


def test_nam56r_tiling_counts():
    p = parse_pattern("AEMEAEMEAEMR", 52)
    c = p.counts()
    assert (c["A"], c["E"], c["M"], c["R"], c["D"], c["F"]) == (13, 22, 13, 4, 0, 0)
    # R lands at 1-based layers 12, 24, 36, 48 as in the seed recipe
    assert [l.index + 1 for l in p.layers if l.letter == "R"] == [12, 24, 36, 48]


@given(pattern=letters, depth=st.integers(1, 80))
def test_tiling_property(pattern, depth):
    if len(pattern) > depth:
        with pytest.raises(RecipeError):
            parse_pattern(pattern, depth)
        return
    p = parse_pattern(pattern, depth)
    assert p.depth == depth
    assert p.letters == "".join(pattern[i % len(pattern)] for i in range(depth))
    assert sum(p.counts().values()) == depth
    for c in LETTERS:
        assert p.counts()[c] == p.letters.count(c)


@given(pattern=letters)
def test_full_length_round_trip(pattern):
    p = parse_pattern(pattern, len(pattern))
    assert p.letters == pattern
    assert parse_pattern(p.with_stages(), len(pattern)).letters == pattern


@given(pattern=st.text(alphabet=LETTERS, min_size=2, max_size=20), data=st.data())
def test_stages_round_trip(pattern, data):
    cut = data.draw(st.integers(1, len(pattern) - 1))
    staged = pattern[:cut] + " | " + pattern[cut:]
    p = parse_pattern(staged, len(pattern))
    assert p.letters == pattern
    assert p.stage_boundaries == (cut,)
    assert [l.stage for l in p.layers] == [0] * cut + [1] * (len(pattern) - cut)
    assert parse_pattern(p.with_stages(), len(pattern)) == p


def test_whitespace_ignored():
    assert parse_pattern(" A E\tM ", 3).letters == "AEM"


def test_overrides_shown():
    p = parse_pattern("AEME", 8, {0: "R", 7: "F"})
    assert p.letters == "REMEAEMF"
    assert [l.overridden for l in p.layers] == [True] + [False] * 6 + [True]


@pytest.mark.parametrize("pattern,depth,overrides,needle", [
    ("", 4, None, "no layer letters"),
    ("   ", 4, None, "no layer letters"),
    ("AXM", 3, None, "unknown layer letter 'X'"),
    ("a", 1, None, "unknown layer letter 'a'"),
    ("AEMEA", 3, None, "more than depth"),
    ("AE|ME", 8, None, "full length"),
    ("|AE", 2, None, "empty pipeline stage"),
    ("AE|", 2, None, "empty pipeline stage"),
    ("A||E", 2, None, "empty pipeline stage"),
    ("AE", 4, {4: "M"}, "layer index"),
    ("AE", 4, {1: "Q"}, "override must be one of"),
])
def test_pattern_errors(pattern, depth, overrides, needle):
    with pytest.raises(RecipeError) as e:
        parse_pattern(pattern, depth, overrides)
    assert needle in str(e.value)


@settings(max_examples=200)
@given(st.text(max_size=30), st.integers(-3, 40))
def test_random_input_gives_pattern_or_own_error(text, depth):
    try:
        p = parse_pattern(text, depth)
    except RecipeError:
        return
    assert p.depth == depth
