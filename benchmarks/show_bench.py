"""Print `megacpp bench`'s text report from its --json output (or from a peer
script's JSON, whose "megacpp" key holds it), kernel profiles included; or,
with --diff, what changed from one result to another (an A/B of a setting):
tokens/s, step, peak memory, GPU time by kernel kind and the profiled
kernels that moved most.

    python benchmarks/show_bench.py FILE.json [FILE.json ...]
    python benchmarks/show_bench.py --diff A.json B.json
    python benchmarks/show_bench.py --rows FILE.json [FILE.json ...]

--rows: one line a file, in the order given (an A/B's runs): tokens/s, MFU,
peak memory, the SM clock while timed and the precision; a file that holds
no result (a run cut by its time limit) says so and the rest still print.
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import fields

from megacpp.train.bench import BenchResult, bench_text
from megacpp.train.kernel_profile import KernelProfile, profile_text


def _result(path: str) -> dict:
    with open(path) as f:
        d = json.load(f)
    d = d.get("megacpp", d)
    if "recipe_hash" not in d:
        raise SystemExit(f"show_bench: {path}: no megacpp bench result (no recipe_hash)")
    return d


def _by_kernel(top: list[dict]) -> dict[str, float]:
    """ms by kernel name, inductor's numeric suffix dropped (triton_poi_fused_..._26 and
    ..._2 are the same fusion compiled in another graph), same names summed."""
    out: dict[str, float] = {}
    for k in top:
        name = re.sub(r"_\d+$", "", k["name"]) if k["name"].startswith("triton_") else k["name"]
        out[name] = out.get(name, 0.0) + k["ms"]
    return out


def diff_text(a: dict, b: dict, top: int = 8) -> list[str]:
    """Lines saying what changed from bench result a to b."""
    def pct(x, y):
        return f"{(y / x - 1) * 100:+.1f}%" if x else "n/a"
    lines = [f"{a['recipe']} ({a['recipe_hash'][:12]}) -> {b['recipe']} ({b['recipe_hash'][:12]})",
             f"  tokens/s {a['tokens_per_s']:,.0f} -> {b['tokens_per_s']:,.0f} ({pct(a['tokens_per_s'], b['tokens_per_s'])}); "
             f"step {a['step_ms_median']:.1f} -> {b['step_ms_median']:.1f} ms; "
             f"peak {a['peak_memory_gib']:.2f} -> {b['peak_memory_gib']:.2f} GiB"]
    pa, pb = a.get("step_profile") or {}, b.get("step_profile") or {}
    if pa and pb:
        kinds = sorted(set(pa["kinds_ms"]) | set(pb["kinds_ms"]),
                       key=lambda k: -abs(pb["kinds_ms"].get(k, 0) - pa["kinds_ms"].get(k, 0)))
        lines.append(f"  GPU busy {pa['busy_ms']:.1f} -> {pb['busy_ms']:.1f} ms; by kind: " + ", ".join(
            f"{k} {pa['kinds_ms'].get(k, 0):.1f} -> {pb['kinds_ms'].get(k, 0):.1f}" for k in kinds))
        ta, tb = _by_kernel(pa.get("top", [])), _by_kernel(pb.get("top", []))
        moved = sorted(set(ta) | set(tb), key=lambda n: -abs(tb.get(n, 0) - ta.get(n, 0)))
        lines.append(f"  kernels that moved most (of each profile's top {len(pa.get('top', []))}; "
                     "absent = not in that top list):")
        for n in moved[:top]:
            x, y = ta.get(n), tb.get(n)
            fx = f"{x:7.2f}" if x is not None else "   -   "
            fy = f"{y:7.2f}" if y is not None else "   -   "
            lines.append(f"    {fx} -> {fy} ms  {n[:90]}")
    return lines


def row_text(path: str) -> str:
    import os
    name = os.path.basename(path)
    try:
        d = _result(path)
    except (OSError, ValueError, SystemExit) as e:
        return f"{name:14} no result ({str(e)[:60] or type(e).__name__})"
    c = d.get("clocks") or {}
    mfu = f"{d['mfu'] * 100:5.1f}%" if d.get("mfu") is not None else "  n/a"
    return (f"{name:14} {d['tokens_per_s']:>10,.0f} tok/s  MFU {mfu}  peak {d['peak_memory_gib']:.2f} GiB  "
            f"SM {c.get('sm_mhz_median', '?')}  {d.get('precision', '')}")


def main(paths: list[str]) -> int:
    if paths and paths[0] == "--rows":
        for path in paths[1:]:
            print(row_text(path))
        return 0
    if paths and paths[0] == "--diff":
        if len(paths) != 3:
            print("usage: show_bench.py --diff A.json B.json", file=sys.stderr)
            return 2
        print("\n".join(diff_text(_result(paths[1]), _result(paths[2]))))
        return 0
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
