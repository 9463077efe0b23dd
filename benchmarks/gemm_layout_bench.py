"""Two GEMM layouts the profiles point at, timed on the GPU before the model changes.

1. The experts' grouped GEMM with its weight stored (E, K, N) (the model's
   layout: N contiguous, so the forward's B operand is MN-major) against
   (E, N, K) handed in as a transposed view (K-major, as nn.Linear's weight
   is), and against (E, K, N) whose forward alone runs on a K-major copy. In nam-1b's profile (fourteenth session) the forward grouped GEMMs ran
   at 481-501 TFLOP/s while the input-gradient ones, whose B operand is the
   transposed (K-major) weight, ran at 611-686.
2. A dense projection whose output width is not a multiple of the GEMM tiles
   (the Mamba-2 in_proj: nam-1b 2048 -> 8512 at 557 TFLOP/s, nam-125m
   768 -> 3352), against its weight padded with zero rows to a multiple of
   128 and of 256, the output sliced back (the slice's copy in the backward
   is timed with it).

3. The experts' weight gradient alone with its operands as autograd hands
   them (tokens are rows: both MN-major) against token-contiguous copies
   (the "fwd ms" column is then the weight gradient's time, copies included).

4. nam-1b's in_proj forward held for --sustain-s seconds with the card's
   clocks sampled: how far a sustained GEMM load pulls the clock down.

Each variant: forward alone and forward + backward (autograd, as the model
runs them), CUDA events, bf16; outputs and gradients checked against the
first variant of its group (the same math: they must agree to bf16 rounding).

    python benchmarks/gemm_layout_bench.py [--json OUT] [--iters 20]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

from kernel_check_util import cuda_time, expert_batch

GROUPED = {  # name: (rows, experts, d_in, d_out)
    "nam-125m w_in": (65536, 8, 768, 1536),
    "nam-125m w_out": (65536, 8, 768, 768),
    "nam-1b w_in": (65536, 8, 2048, 2816),
    "nam-1b w_out": (65536, 8, 1408, 2048),
}
DENSE = {  # name: (rows, d_in, d_out)
    "nam-125m in_proj": (32768, 768, 3352),
    "nam-1b in_proj": (32768, 2048, 8512),
}


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


class _KMajorForward(torch.autograd.Function):
    """_grouped_mm(x, w) with w stored (E, K, N) whose forward runs on a K-major
    copy of w (one transposing copy, E*K*N elements) and whose backward is
    torch's own: the input gradient on w transposed (K-major already), the
    weight gradient as autograd computes it. The third variant: what the
    model would run if the K-major forward wins and the backward should not
    lose."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w.transpose(1, 2).contiguous().transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, g):
        x, w, offs = ctx.saved_tensors
        g = g.contiguous()
        return (torch._grouped_mm(g, w.transpose(1, 2), offs=offs),
                torch._grouped_mm(x.t(), g, offs=offs), None)


def grouped_rows(gen, iters: int) -> list[dict]:
    out = []
    for name, (rows, E, k, n) in GROUPED.items():
        offs, x0, w_kn, g = expert_batch(gen, rows, E, k, n)
        ref = None
        # (E, K, N) as stored; (E, N, K) stored and handed in transposed
        # (E, K, N) as stored; (E, N, K) stored and handed in transposed; (E, K, N)
        # stored with a K-major copy for the forward only
        variants = (("E,K,N", w_kn), ("E,N,K (transposed view)", w_kn.transpose(1, 2).contiguous()),
                    ("E,K,N, K-major fwd copy", w_kn))
        for layout, stored in variants:
            x = x0.clone().requires_grad_()
            w = stored.clone().requires_grad_()
            nk = layout.startswith("E,N,K")

            def call(a, b):
                if layout.endswith("copy"):
                    return _KMajorForward.apply(a, b, offs)
                return torch._grouped_mm(a, b.transpose(1, 2) if nk else b, offs=offs)

            def fwd():
                with torch.no_grad():
                    call(x, w)

            def step():
                x.grad = w.grad = None
                call(x, w).backward(g)

            ms_f, ms_fb = cuda_time(fwd, iters), cuda_time(step, iters)
            step()
            y = call(x.detach(), w.detach())
            dw = w.grad.transpose(1, 2) if nk else w.grad
            got = (y, x.grad, dw)
            if ref is None:
                ref = got
            out.append({"group": name, "variant": layout, "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb,
                        "fwd_tflops": 2 * rows * k * n / ms_f / 1e9,
                        "fwd_bwd_tflops": 6 * rows * k * n / ms_fb / 1e9,
                        "rel_err": max(_rel(a, b) for a, b in zip(got, ref))})
    return out


def wgrad_rows(gen, iters: int) -> list[dict]:
    """The experts' weight gradient alone: dW_e = x_e^T g_e, the reduction over
    the tokens. As autograd runs it both operands are MN-major (tokens are
    their rows); the second variant copies x and g token-contiguous first
    (the copies timed with it). nam-125m's ran at 376-493 TFLOP/s. Groups here
    start at multiples of 8 rows: with the tokens contiguous torch._grouped_mm
    asserts 16-byte group starts (a device-side assert on the H200, 2026-11-28),
    so the second variant would need the router to pad its groups."""
    out = []
    for name, (rows, E, k, n) in GROUPED.items():
        offs, x, _, g = expert_batch(gen, rows, E, k, n, align=8)
        ref = None
        for variant in ("x^T g (as autograd)", "token-contiguous copies"):
            def dw():
                if variant.startswith("x^T"):
                    return torch._grouped_mm(x.t(), g, offs=offs)
                return torch._grouped_mm(x.t().contiguous(), g.t().contiguous().t(), offs=offs)
            ms = cuda_time(dw, iters)
            got = dw()
            if ref is None:
                ref = got
            tflops = 2 * rows * k * n / ms / 1e9
            out.append({"group": name + " dW", "variant": variant, "fwd_ms": ms, "fwd_bwd_ms": None,
                        "fwd_tflops": tflops, "fwd_bwd_tflops": None, "rel_err": _rel(got, ref)})
    return out


def dense_rows(gen, iters: int) -> list[dict]:
    out = []
    for name, (rows, k, n) in DENSE.items():
        x0 = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
        w0 = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).bfloat16()
        g = torch.randn(rows, n, device="cuda", generator=gen).bfloat16()
        ref = None
        for pad in (None, 128, 256):
            width = n if pad is None else _round_up(n, pad)
            x = x0.clone().requires_grad_()
            w = torch.cat([w0, w0.new_zeros(width - n, k)]).requires_grad_()

            def fwd():
                with torch.no_grad():
                    F.linear(x, w)[:, :n]

            def step():
                x.grad = w.grad = None
                F.linear(x, w)[:, :n].backward(g)

            ms_f, ms_fb = cuda_time(fwd, iters), cuda_time(step, iters)
            step()
            got = (F.linear(x.detach(), w.detach())[:, :n], x.grad, w.grad[:n])
            if ref is None:
                ref = got
            out.append({"group": name, "variant": f"N {width}" + ("" if pad is None else f" (zero rows to x{pad})"),
                        "fwd_ms": ms_f, "fwd_bwd_ms": ms_fb,
                        "fwd_tflops": 2 * rows * k * n / ms_f / 1e9,
                        "fwd_bwd_tflops": 6 * rows * k * n / ms_fb / 1e9,
                        "rel_err": max(_rel(a, b) for a, b in zip(got, ref))})
    return out


def sustained(gen, seconds: float) -> dict:
    """nam-1b's in_proj forward GEMM back to back for `seconds`, with the card's
    clocks sampled meanwhile: against the short bursts above, how far a
    sustained GEMM load (as in a nam-1b step, where these GEMMs ran at 557
    TFLOP/s) pulls the clock down."""
    import time

    from megacpp.train.gpu_clocks import ClockSampler
    rows, k, n = DENSE["nam-1b in_proj"]
    x = torch.randn(rows, k, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=gen) * k ** -0.5).bfloat16()
    F.linear(x, w)
    torch.cuda.synchronize()
    calls = 0
    with ClockSampler(torch.device("cuda", torch.cuda.current_device())) as clocks:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(20):
                F.linear(x, w)
            torch.cuda.synchronize()
            calls += 20
        dt = time.perf_counter() - t0
    return {"gemm": "nam-1b in_proj fwd", "seconds": dt, "calls": calls,
            "tflops": calls * 2 * rows * k * n / dt / 1e12, "clocks": clocks.result}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sustain-s", type=float, default=10.0, help="seconds of the sustained GEMM (0: skip)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_layout_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = grouped_rows(gen, args.iters) + wgrad_rows(gen, args.iters) + dense_rows(gen, args.iters)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; bf16, useful FLOPs only")
    print(f"{'GEMM':21s} {'variant':28s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'f+b ms':>8s} {'TFLOP/s':>8s} {'rel err':>9s}")
    bad = []
    for r in rows:
        fb = (f"{r['fwd_bwd_ms']:8.3f} {r['fwd_bwd_tflops']:8.0f}" if r["fwd_bwd_ms"] is not None
              else f"{'-':>8s} {'-':>8s}")
        print(f"{r['group']:21s} {r['variant']:28s} {r['fwd_ms']:8.3f} {r['fwd_tflops']:8.0f} {fb} {r['rel_err']:9.2e}")
        if not r["rel_err"] < 1e-2:
            bad.append(f"{r['group']} {r['variant']}: rel err {r['rel_err']:.2e}")
    held = sustained(gen, args.sustain_s) if args.sustain_s > 0 else None
    if held:
        from megacpp.train.gpu_clocks import clocks_text
        print(f"\n{held['gemm']} back to back for {held['seconds']:.1f} s: {held['tflops']:.0f} TFLOP/s; "
              + clocks_text(held["clocks"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows,
                       "sustained": held}, f, indent=1)
    if bad:
        print("gemm_layout_bench: variants disagree with the first of their group:\n  " + "\n  ".join(bad),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
