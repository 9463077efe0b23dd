"""Memory patches on one GPU: extra peak memory and time, plain path vs patch.

Loss path (FACTS §3 shapes): 16384 tokens, hidden 1024, vocab 32768 and 65536,
bf16 inputs, forward + backward of mean cross-entropy:
  naive   = logits = hidden @ W.T, then F.cross_entropy (the unpatched path)
  liger   = Liger's fused linear cross-entropy (linear_ce patch, CUDA backend)
  triton  = megacpp's Triton op (linear_ce patch, CUDA backend; 4096-token
            chunks, and 8192 as "triton-8192")
  chunked = megacpp.ops.linear_ce (linear_ce patch, portable backend)
and nam-125m's head as the trainer calls it: 32768 tokens, hidden 768, vocab
32768, float32 hidden states and master weight under bf16 autocast.
DSA indexer: batch 1, sequence 4096 and 8192, 8 index heads of dim 64,
top-k 256 (NAM56R), causal:
  naive   = full (batch, seq, seq) scores, then top-k (the unpatched path)
  chunked = megacpp.ops.dsa_index.indexer_topk (dsa_indexer_fused patch)
"Extra peak" = peak allocated during the call minus what was allocated
before it (inputs). Times are medians of CUDA-event timings after warm-up.

    python benchmarks/memory_patches.py [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from kernel_check_util import cuda_time  # this folder: the script runs as benchmarks/memory_patches.py


def measure(fn, reps=10, warmup=2):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    return extra / 2**30, cuda_time(fn, reps, warmup=0)  # warmed up above


def loss_path(rows, shapes):
    from functools import partial

    from megacpp.patches.linear_ce import chunked_linear_ce, liger_linear_ce, plain_linear_ce, triton_linear_ce

    impls = (("naive", plain_linear_ce), ("liger", liger_linear_ce), ("triton", triton_linear_ce),
             ("triton-8192", partial(triton_linear_ce, chunk_size=8192)), ("chunked", chunked_linear_ce))
    for tokens, d, vocab, wdtype, autocast in shapes:
        # autocast: float32 hidden states and weight under bf16 autocast, as the trainer calls the head
        h0 = torch.randn(tokens, d, device="cuda", dtype=torch.float32 if autocast else torch.bfloat16)
        w0 = (torch.randn(vocab, d, device="cuda") * d ** -0.5).to(wdtype)
        tgt = torch.randint(0, vocab, (tokens,), device="cuda")
        h = h0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        for name, fn in impls:
            def run():
                h.grad = w.grad = None
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    loss = fn(h, w, tgt)
                loss.backward()
            try:
                gib, ms = measure(run)
                rows.append({"bench": "loss_path", "vocab": vocab, "tokens": tokens, "hidden": d,
                             "weight": str(wdtype).replace("torch.", ""), "autocast": autocast, "impl": name, "extra_gib": gib, "ms": ms})
            except Exception as e:  # a missing backend is reported, not fatal
                rows.append({"bench": "loss_path", "vocab": vocab, "impl": name, "error": repr(e)[:200]})
            h.grad = w.grad = None
        del h, w, h0, w0
        torch.cuda.empty_cache()
    from megacpp.ops.linear_ce import triton_linear_ce as T
    rows.append({"bench": "loss_path", "vocab": 0, "impl": "triton d_weight path", "value_str": str(T.DW_PATH)})


def dsa_indexer(rows):
    from megacpp.ops.dsa_index import indexer_topk, indexer_topk_naive

    heads, dim, topk = 8, 64, 256
    for seq in (4096, 8192):
        q = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, seq, dim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(1, seq, heads, device="cuda", dtype=torch.bfloat16)
        res = {}
        for name, fn in (("naive", indexer_topk_naive), ("chunked", indexer_topk)):
            def run():
                with torch.no_grad():
                    res[name] = fn(q, k, w, topk)
            try:
                gib, ms = measure(run, reps=5, warmup=1)
                rows.append({"bench": "dsa_indexer", "seq": seq, "impl": name, "extra_gib": gib, "ms": ms})
            except torch.OutOfMemoryError as e:
                rows.append({"bench": "dsa_indexer", "seq": seq, "impl": name, "error": "OOM"})
        if "naive" in res and "chunked" in res:
            same = float((res["naive"][0] == res["chunked"][0]).float().mean())
            rows.append({"bench": "dsa_indexer", "seq": seq, "impl": "index agreement", "value": same})
        del q, k, w
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--loss-only", action="store_true", help="the loss path only (no DSA indexer)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    rows: list[dict] = []
    # FACTS §3's shapes (bf16 weight), then nam-125m's head as the trainer calls it
    # (two micro-batches' worth is two calls: 16 x 2048 tokens, float32 master weight)
    loss_path(rows, [(16384, 1024, 32768, torch.bfloat16, False), (16384, 1024, 65536, torch.bfloat16, False),
                     (32768, 768, 32768, torch.float32, True)])
    if not args.loss_only:
        dsa_indexer(rows)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'bench':12} {'size':>6} {'impl':16} {'extra peak GiB':>15} {'ms':>9}")
    for r in rows:
        size = r.get("vocab", r.get("seq"))
        if "error" in r:
            print(f"{r['bench']:12} {size:>6} {r['impl']:16} {r['error']}")
        elif "value_str" in r:
            print(f"{r['bench']:12} {size:>6} {r['impl']:16} {r['value_str']}")
        elif "value" in r:
            print(f"{r['bench']:12} {size:>6} {r['impl']:16} {r['value']:>15.4f}")
        else:
            print(f"{r['bench']:12} {size:>6} {r['impl']:16} {r['extra_gib']:>15.3f} {r['ms']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
