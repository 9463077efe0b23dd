"""The experts' grouped GEMM, forward + backward, with the weight gradient cut
into 1, 2 or 4 parts per expert (model.moe.grouped_mm, policy.kernels.moe_wgrad_splits).

At nam-125m's experts the weight gradient's grouped GEMMs ran at 36-49% of an
H200's bf16 peak (few output tiles per expert: 768 x 768 and 768 x 1536); this
times the split-K variant against torch's own backward at nam-125m's and
nam-1b's expert shapes (16 x 2048 tokens, top-2 of 8 experts: 65536 rows in
8 groups of near-uniform random size, bf16), CUDA events, and checks each
variant's gradients against the unsplit ones.

    python benchmarks/moe_wgrad_bench.py [--splits 1 2 4] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from kernel_check_util import cuda_time, expert_batch
from megacpp.model.moe import grouped_mm

SHAPES = {  # name: (rows, experts, d_in, d_out) of each grouped GEMM of an expert FFN
    "nam-125m w_in": (65536, 8, 768, 1536),
    "nam-125m w_out": (65536, 8, 768, 768),
    "nam-1b w_in": (65536, 8, 2048, 2816),
    "nam-1b w_out": (65536, 8, 1408, 2048),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("moe_wgrad_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    for name, (rows, E, k, n) in SHAPES.items():
        offs, x0, w0, g = expert_batch(gen, rows, E, k, n)
        ref = None
        for s in args.splits:
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()

            def step():
                x.grad = w.grad = None
                grouped_mm(x, w, offs, s).backward(g)
            ms = cuda_time(step, 20)
            step()
            if ref is None:
                ref = (x.grad.float(), w.grad.float())
            err = float((w.grad.float() - ref[1]).norm() / ref[1].norm())
            flops = 6 * rows * k * n
            rows_out.append({"shape": name, "splits": s, "ms": ms, "tflops": flops / ms / 1e9,
                             "dw_rel_err_vs_unsplit": err,
                             "dx_equal": bool(torch.equal(x.grad.float(), ref[0]))})
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; forward + backward of one grouped GEMM")
    print(f"{'shape':16s} {'splits':>6s} {'ms':>8s} {'TFLOP/s':>8s} {'dW rel err':>11s} {'dX equal':>9s}")
    for r in rows_out:
        print(f"{r['shape']:16s} {r['splits']:6d} {r['ms']:8.3f} {r['tflops']:8.0f} "
              f"{r['dw_rel_err_vs_unsplit']:11.2e} {str(r['dx_equal']):>9s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
