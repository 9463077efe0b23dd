"""Small synthetic C++ trees for the data-pipeline tests."""
from __future__ import annotations

import random
from pathlib import Path

from megacpp.data.prepare import PrepareConfig

_TYPES = ["int", "long", "double", "float", "std::size_t", "unsigned", "char", "bool"]
_WORDS = ["alpha", "beta", "gamma", "delta", "node", "tree", "graph", "edge", "buffer", "stream",
          "parse", "token", "value", "index", "count", "cache", "table", "queue", "stack", "heap"]

# Small rows and vocab keep every prepare in the tests well under a second.
SMALL = PrepareConfig(vocab_size=400, seq_len=32, max_bytes=0, split=(0.6, 0.2, 0.2))


def cpp_file(rng: random.Random, n_funcs: int = 4) -> str:
    """A plausible, varied C++ translation unit."""
    lines = ["#include <vector>", "#include <string>", f"namespace {rng.choice(_WORDS)}_{rng.randrange(1000)} {{", ""]
    for _ in range(n_funcs):
        name = f"{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{rng.randrange(10_000)}"
        t = rng.choice(_TYPES)
        lines += [
            f"{t} {name}(const std::vector<{t}>& xs, {rng.choice(_TYPES)} k) {{",
            f"  {t} acc = {rng.randrange(100)};",
            "  for (std::size_t i = 0; i < xs.size(); ++i) {",
            f"    if (xs[i] > k) acc += xs[i] * {rng.randrange(2, 50)};",
            f"    else acc -= {rng.choice(_WORDS)}_helper(xs[i]);",
            "  }",
            f"  return acc / {rng.randrange(1, 9)};  // {rng.choice(_WORDS)} {rng.choice(_WORDS)}",
            "}",
            "",
        ]
    lines.append("}  // namespace")
    return "\n".join(lines) + "\n"


def near_variant(text: str, rng: random.Random) -> str:
    """The same file with one line edited: a near-duplicate."""
    lines = text.split("\n")
    i = rng.randrange(4, len(lines) - 2)
    lines[i] = lines[i] + f"  // tweak {rng.randrange(1000)}"
    return "\n".join(lines)


def make_tree(root: Path, n_files: int = 60, seed: int = 0, near_dups: int = 0) -> Path:
    """`n_files` distinct .cpp/.h files, plus `near_dups` near-duplicate variants of each of the first files."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        ext = ".cpp" if i % 3 else ".h"
        sub = root / f"mod{i % 4}"
        sub.mkdir(exist_ok=True)
        text = cpp_file(rng, n_funcs=rng.randrange(3, 9))
        (sub / f"file{i}{ext}").write_text(text)
        if i < 8:
            for j in range(near_dups):
                (sub / f"file{i}_copy{j}{ext}").write_text(near_variant(text, rng))
    return root
