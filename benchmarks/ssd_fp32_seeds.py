"""The Triton SSD's float32 gradients against the float64 reference over many
seeds (a GPU check, not a timing): the distribution of dA's error, which the
CUDA tests bound separately (tests/ops/test_ssd_triton.py DA_TOL_FP32), next
to the worst error of every other output.

    python3 benchmarks/ssd_fp32_seeds.py --seeds 40 [--dtype bfloat16]
    ... --tuned   (float32 at the bf16 sweep's launch, TUNED, which the
                   kernels otherwise apply to half precision only)

Prints one line per case: dA's norm error at the median, 90th percentile and
worst seed, the worst seed's number, and the largest error of the rest.
Exits 1 if any error is not finite.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "ops"))
from test_ssd_triton import CUDA_CASES, compare, make_inputs  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=40)
    ap.add_argument("--first-seed", type=int, default=1)
    ap.add_argument("--cases", default="resets-g2-D,mamba3-g=h,ragged-g1-D-init")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="x, B, C and the initial state's dtype (dt, A, D stay float32)")
    ap.add_argument("--tuned", action="store_true", help="float32 at TUNED's launch")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: under TRITON_INTERPRET=1, to try the script")
    a = ap.parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    from megacpp.ops.ssd import triton_ssd
    if a.tuned:
        for k, v in triton_ssd.TUNED.items():
            triton_ssd.LAUNCH[k] = dict(v)
    cases = {p.id: p.values[0] for p in CUDA_CASES}
    rows, bad = [], False
    for name in a.cases.split(","):
        b, l, h, p, g, n, chunk, with_d, with_init, resets = cases[name]
        da, rest = [], []
        for seed in range(a.first_seed, a.first_seed + a.seeds):
            gen = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            ins = make_inputs(b, l, h, p, g, n, dtype=getattr(torch, a.dtype), device=a.device, with_d=with_d,
                              with_init=with_init, resets=resets, gen=gen)
            errs = compare(triton_ssd.ssd_triton, ins, chunk, seed)
            bad |= not all(math.isfinite(v) for e in errs.values() for v in e)
            da.append((errs["dA"][0], errs["dA"][1], seed))
            rest.append(max(max(e) for k, e in errs.items() if k != "dA"))
        da.sort()
        norms = [d[0] for d in da]
        row = dict(case=name, dtype=a.dtype, tuned=a.tuned, seeds=a.seeds,
                   dA_norm_median=norms[(len(norms) - 1) // 2], dA_norm_p90=norms[int(0.9 * (len(norms) - 1))],
                   dA_norm_worst=norms[-1], dA_max_worst=max(d[1] for d in da), worst_seed=da[-1][2],
                   rest_worst=max(rest))
        rows.append(row)
        print(f"{name:18s} {a.dtype:8s} tuned={int(a.tuned)}  dA norm: median {row['dA_norm_median']:.2e}"
              f"  p90 {row['dA_norm_p90']:.2e}  worst {row['dA_norm_worst']:.2e} (seed {row['worst_seed']})"
              f"  max {row['dA_max_worst']:.2e}  | rest worst {row['rest_worst']:.2e}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
