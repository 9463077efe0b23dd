"""Sweep FlexAttention's launch options for the A layers' packed attention (issue 8).

FlexAttention's kernels come from inductor with one default launch per
(GPU, head dim, dtype); the backward of nam-125m's six A layers is 5.5 ms of
its step (twelfth session's profile). This times the document-masked
attention as the model calls it (GQA, causal within packed documents,
synthetic document lengths as `megacpp bench` draws them, bf16) with
`kernel_options` varied by coordinate descent: first the forward's options
(`fwd_` prefix, objective: the forward kernels' own time), then the
backward's (`bwd_`, objective: the backward kernels' own time), each option
tried at every value with the others at their best so far. Every variant's
o, dq, dk, dv are checked against the default launch's; a variant that
fails to compile or differs by more than --tol is dropped. The chosen set is
then timed against the defaults (kernel time from torch.profiler, and
forward + backward wall time by CUDA events), and printed as the
`attention.FLEX_TUNED` entry last.

    python benchmarks/flex_tune.py [--shape 16,2048,12,4,64] [--passes 1] [--json OUT]

Shape: batch,seqlen,heads,kv_heads,head_dim (nam-125m's A layer by default;
nam-1b's is 8,2048,16,4,128).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kernel_check_util import cuda_time
from tune_util import coordinate_descent, rel

# Each try compiles flex's kernels afresh (10-30 s): the values are few, and
# the default launch (inductor's, e.g. sm90 bf16 d64: forward 128x128, 4 warps,
# 3 stages; backward 64/128/128/64, 8 warps, 3 stages) is always tried first.
FWD_OPTIONS = {
    "fwd_BLOCK_M": [64, 128],
    "fwd_BLOCK_N": [64, 128],
    "fwd_num_warps": [4, 8],
    "fwd_num_stages": [2, 3, 4],
    "fwd_USE_TMA": [True],
    "fwd_ROWS_GUARANTEED_SAFE": [True],   # every row keeps its diagonal under the causal document mask
}
BWD_OPTIONS = {
    "bwd_num_stages": [2, 3, 4],
    "bwd_num_warps": [4, 8],
    "bwd_BLOCK_M1": [32, 64],
    "bwd_BLOCK_N1": [64, 128],
    "bwd_BLOCK_M2": [64, 128],
    "bwd_BLOCK_N2": [32, 64],
    "bwd_USE_TMA": [True],
}


def make_inputs(shape, seed=0):
    from megacpp.model.context import document_block_mask
    from megacpp.train.bench import synthetic_batch

    b, t, h, hk, d = shape
    batch = synthetic_batch(1000, b, t, "cuda", seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    q = torch.randn(b, h, t, d, **kw).bfloat16().requires_grad_()
    k = torch.randn(b, hk, t, d, **kw).bfloat16().requires_grad_()
    v = torch.randn(b, hk, t, d, **kw).bfloat16().requires_grad_()
    do = torch.randn(b, h, t, d, **kw).bfloat16()
    return q, k, v, do, document_block_mask(batch["doc_ids"])


def compiled_attention(block_mask, options: dict):
    from torch.nn.attention.flex_attention import flex_attention

    opts = dict(options) or None
    torch._dynamo.reset()

    def attend(q, k, v):
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=opts)
    return torch.compile(attend, dynamic=False)


def fwd_bwd(fn, inputs):
    q, k, v, do, _ = inputs
    for x in (q, k, v):
        x.grad = None
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def kernel_split_ms(fn, reps: int = 5) -> tuple[float, float]:
    """(forward, backward) ms a call of the kernels whose names say flex_attention."""
    from torch.profiler import ProfilerActivity, profile

    from megacpp.train.kernel_profile import device_events

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    fwd = bwd = 0.0
    for name, s, e in device_events(prof):
        if "flex_attention" not in name:
            continue
        if "backward" in name:
            bwd += e - s
        else:
            fwd += e - s
    return fwd / 1e3 / reps, bwd / 1e3 / reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="16,2048,12,4,64", help="batch,seqlen,heads,kv_heads,head_dim")
    ap.add_argument("--passes", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-2, help="largest relative difference from the defaults")
    ap.add_argument("--budget-s", type=float, default=1e9,
                    help="per part (forward, backward): stop trying variants after this many seconds")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("flex_tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    shape = tuple(int(x) for x in args.shape.split(","))
    if len(shape) != 5:
        raise SystemExit(f"--shape {args.shape!r}: expected batch,seqlen,heads,kv_heads,head_dim")
    inputs = make_inputs(shape)
    ref = [x.clone() for x in fwd_bwd(compiled_attention(inputs[4], {}), inputs)]
    log: list = []
    fixed: dict = {}

    t0 = [time.monotonic()]   # the budget is per part (forward, then backward)

    def try_cfg_for(part: str):
        def try_cfg(cfg):
            if cfg and time.monotonic() - t0[0] > args.budget_s:
                return None, "time budget spent"
            try:
                fn = compiled_attention(inputs[4], {**fixed, **cfg})
                out = fwd_bwd(fn, inputs)
                torch.cuda.synchronize()
                err = max(rel(o, r) for o, r in zip(out, ref))
                if not err <= args.tol:
                    return None, f"mismatch {err:.2e}"
                f, b = kernel_split_ms(lambda: fwd_bwd(fn, inputs))
                return (f if part == "fwd" else b), err
            except Exception as e:  # noqa: BLE001 - a variant that does not compile or launch is dropped
                return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        return try_cfg

    results = {}
    for part, options in (("fwd", FWD_OPTIONS), ("bwd", BWD_OPTIONS)):
        t0[0] = time.monotonic()
        r = coordinate_descent(options, try_cfg_for(part), log, part, passes=args.passes)
        results[part] = r
        fixed.update(r["config"])
        print(f"{part}: default {r['default_ms']} ms -> {r['ms']} ms with {r['config']}", flush=True)

    rows = []
    for label, opts in (("inductor default", {}), ("swept", fixed)):
        fn = compiled_attention(inputs[4], opts)
        fwd_bwd(fn, inputs)
        f, b = kernel_split_ms(lambda: fwd_bwd(fn, inputs))
        wall = cuda_time(lambda: fwd_bwd(fn, inputs), 20)
        rows.append({"launch": label, "options": opts, "fwd_kernel_ms": f, "bwd_kernel_ms": b,
                     "fwd_bwd_event_ms": wall})
    out = {"shape": dict(zip(("batch", "seqlen", "heads", "kv_heads", "head_dim"), shape)),
           "device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
           "torch": torch.__version__, "results": results, "rows": rows, "log": log}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(f"\n{out['device']}, shape {args.shape}, bf16, document-causal mask")
    print(f"{'launch':18s} {'fwd kernels ms':>15s} {'bwd kernels ms':>15s} {'fwd+bwd event ms':>17s}")
    for r in rows:
        print(f"{r['launch']:18s} {r['fwd_kernel_ms']:15.3f} {r['bwd_kernel_ms']:15.3f} {r['fwd_bwd_event_ms']:17.3f}")
    cap = tuple(out["capability"])
    print(f"FLEX_TUNED entry: {(cap[0], cap[1], shape[4])!r}: {fixed!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
