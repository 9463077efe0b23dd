"""The MoE experts' grouped GEMM in bf16 against FP8 (ops.fp8_grouped), on the GPU.

For each expert weight of nam-125m and nam-1b (balanced random groups as the
router makes them, 65,536 rows: two micro-batches' top-2 slots of 16 x 2048
tokens): torch._grouped_mm against fp8_grouped_mm, each compiled (as the
model runs them: inductor fuses the FP8 quantization into its passes),
forward alone and forward + backward, with each quantizer (quant_paths:
"torch", "torchao", "triton"), and with the weight gradient in FP8 too
(ops.fp8_grouped.wgrad). FLOP rates count the bf16 work (6 x
rows x d_in x d_out for forward + backward) so the columns compare. Outputs
and gradients of the FP8 path against bf16's: its error, printed.

    python benchmarks/fp8_grouped_bench.py [--json OUT] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from gemm_layout_bench import GROUPED  # the experts' weights of nam-125m and nam-1b, 65,536 rows
from kernel_check_util import cuda_time, expert_batch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def rows_for(gen, iters: int) -> list[dict]:
    from megacpp.ops.fp8_grouped import fp8_grouped_mm

    # each compiled function meets 4 shapes x (no_grad, grad, detached inputs): past dynamo's
    # default limit of 8 graphs it ran eager (nineteenth session: the FP8 rows then showed the
    # uncompiled quantizers' time, not the model's)
    torch._dynamo.config.recompile_limit = 64

    def bf16(x, w, offs):
        return torch._grouped_mm(x, w, offs=offs)

    impls = {"bf16 torch._grouped_mm": torch.compile(bf16)}
    for q in ("torch", "torchao", "triton"):
        impls[f"fp8 (fwd, dgrad), quant {q}"] = torch.compile(lambda x, w, offs, q=q: fp8_grouped_mm(x, w, offs, q))
    # the weight gradient in FP8 too (ops.fp8_grouped.wgrad: per-expert column scales, 16-row groups)
    impls["fp8 (fwd, dgrad, wgrad), quant triton"] = torch.compile(
        lambda x, w, offs: fp8_grouped_mm(x, w, offs, "triton", fp8_wgrad=True))
    out = []
    for name, (rows, E, k, n) in GROUPED.items():
        offs, x0, w0, g = expert_batch(gen, rows, E, k, n)
        ref = None
        for label, fn in impls.items():
            x = x0.clone().requires_grad_()
            w = w0.clone().requires_grad_()

            def fwd():
                with torch.no_grad():
                    fn(x, w, offs)

            def step():
                x.grad = w.grad = None
                fn(x, w, offs).backward(g)

            ms_f, ms_fb = cuda_time(fwd, iters), cuda_time(step, iters)
            step()
            got = (fn(x.detach(), w.detach(), offs), x.grad, w.grad)
            if ref is None:
                ref = got
            out.append({"group": name, "variant": label, "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb,
                        "fwd_tflops": 2 * rows * k * n / ms_f / 1e9,
                        "fwd_bwd_tflops": 6 * rows * k * n / ms_fb / 1e9,
                        "rel_err_y_dx_dw": [_rel(a, b) for a, b in zip(got, ref)]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("fp8_grouped_bench: needs CUDA", file=sys.stderr)
        return 2
    from megacpp.ops.fp8_grouped import fp8_grouped_unavailable
    why = fp8_grouped_unavailable(torch.device("cuda"))
    if why:
        print(f"fp8_grouped_bench: {why}", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = rows_for(gen, args.iters)
    print(f"{'GEMM':16s} {'variant':30s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'f+b ms':>8s} {'TFLOP/s':>8s}  err y/dx/dw")
    for r in rows:
        print(f"{r['group']:16s} {r['variant']:30s} {r['fwd_ms']:8.3f} {r['fwd_tflops']:8.0f} "
              f"{r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:8.0f}  "
              + "/".join(f"{e:.1e}" for e in r["rel_err_y_dx_dw"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
