"""Run a megacpp command with a tuning sweep's chosen launch parameters applied (issue 8).

    python3 benchmarks/bench_tuned.py --module megacpp.ops.causal_conv.triton_conv \\
        --tuned conv_tune.json [--kernels bwd_walk] -- bench --recipe nam-125m ...

The sweeps (conv_tune.py, ssd_tune.py, ...) write {"chosen": {kernel: {"config": {...}}}};
this sets the module's TUNED entries from it in this process, prints what it set, then
runs `megacpp <args>`: the whole step with a sweep's launch against the code's
defaults (the same command without this wrapper), before the choice is committed.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("bench_tuned: give the megacpp command after --", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--module", required=True, help="the kernels' module (has KERNELS and TUNED)")
    ap.add_argument("--tuned", required=True, help="a sweep's --json output")
    ap.add_argument("--kernels", nargs="*", help="only these kernels' choices (default: all chosen)")
    args = ap.parse_args(argv[:cut])
    mod = importlib.import_module(args.module)
    with open(args.tuned) as f:
        chosen = json.load(f)["chosen"]
    for k, res in chosen.items():
        if args.kernels and k not in args.kernels:
            continue
        if k not in mod.KERNELS:
            print(f"bench_tuned: {args.tuned}: kernel {k!r} is not one of {args.module}'s", file=sys.stderr)
            return 2
        mod.TUNED[k] = dict(res["config"])
        print(f"bench_tuned: {args.module}.TUNED[{k!r}] = {mod.TUNED[k]}", file=sys.stderr)
    from megacpp.cli import main as megacpp_main
    return megacpp_main(argv[cut + 1:])


if __name__ == "__main__":
    sys.exit(main())
