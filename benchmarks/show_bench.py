"""Print `megacpp bench`'s text report from its --json output (or from a peer
script's JSON, whose "megacpp" key holds it), kernel profiles included.

    python benchmarks/show_bench.py FILE.json [FILE.json ...]
"""
from __future__ import annotations

import json
import sys
from dataclasses import fields

from megacpp.train.bench import BenchResult, bench_text
from megacpp.train.kernel_profile import KernelProfile, profile_text


def main(paths: list[str]) -> int:
    names = {f.name for f in fields(BenchResult)}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        print(f"== {path}")
        if "step_profile" in d.get("peer", {}):
            print("\n".join(profile_text("peer profiled step", KernelProfile(**d["peer"]["step_profile"]))))
        d = d.get("megacpp", d)
        if "recipe_hash" not in d:
            print("  (no megacpp bench result here)")
            continue
        print(bench_text(BenchResult(**{k: v for k, v in d.items() if k in names})))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
