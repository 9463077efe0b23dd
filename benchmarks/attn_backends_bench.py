"""Document-masked attention at an A layer's shape through each backend this
torch has (a GPU probe for issue 8, not a unit test): FlexAttention as the
model calls it (compiled, block mask of the packed documents, the tuned
launch), and the packed variable-length kernels the same documents can run
on with their cumulative lengths instead of a mask — FlashAttention-2's
(`aten._flash_attention_forward/backward`, GQA native) and cuDNN's
(`aten._cudnn_attention_forward/backward`, K and V expanded to every query
head) — plus SDPA's flash kernel on whole rows (causal, no documents: the HF
peer's attention, for scale). Each is timed forward and forward + backward
(CUDA events, median) and checked against FlexAttention's o, dq, dk, dv.

    python3 benchmarks/attn_backends_bench.py [--shape 16,2048,12,4,64] [--json OUT]

A backend this torch lacks, or that fails, prints why and is skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

import torch

from kernel_check_util import cuda_time


def rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def cu_seqlens(doc_ids):
    """Packed (b*t) token stream -> int32 cumulative document lengths, max length."""
    b, t = doc_ids.shape
    start = torch.ones(b, t, dtype=torch.bool, device=doc_ids.device)
    start[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    idx = torch.nonzero(start.reshape(-1)).flatten()
    cu = torch.cat([idx, idx.new_tensor([b * t])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="16,2048,12,4,64", help="batch,seqlen,heads,kv_heads,head_dim")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    from megacpp.model.attention import FLEX_TUNED
    from megacpp.model.context import document_block_mask
    from megacpp.train.bench import synthetic_batch
    from torch.nn.attention.flex_attention import flex_attention

    b, t, h, hk, d = map(int, a.shape.split(","))
    dev = "cuda"
    batch = synthetic_batch(1000, b, t, dev, seed=0)
    doc = batch["doc_ids"]
    cu, max_len = cu_seqlens(doc)
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, t, h, d, device=dev, generator=g).bfloat16()
    k = torch.randn(b, t, hk, d, device=dev, generator=g).bfloat16()
    v = torch.randn(b, t, hk, d, device=dev, generator=g).bfloat16()
    do = torch.randn(b, t, h, d, device=dev, generator=g).bfloat16()
    print(f"shape b{b} t{t} h{h}/{hk} d{d}; {cu.numel() - 1} documents, longest {max_len}; torch {torch.__version__}",
          flush=True)
    # causal-within-document pairs against causal whole rows: the work each backend must do
    lens = (cu[1:] - cu[:-1]).double()
    frac = float((lens * (lens + 1) / 2).sum() / (b * t * (t + 1) / 2))
    print(f"attended pairs: {frac:.3f} of causal whole rows", flush=True)

    cap = torch.cuda.get_device_capability()
    opts = FLEX_TUNED.get((cap[0], cap[1], d))
    bm = document_block_mask(doc)
    flex = torch.compile(lambda q_, k_, v_: flex_attention(q_, k_, v_, block_mask=bm, enable_gqa=True,
                                                           kernel_options=opts), dynamic=False)

    def run_flex(q_, k_, v_):
        return flex(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2)).transpose(1, 2)

    def run_fa2(q_, k_, v_):
        return _Packed.apply(q_, k_, v_, "flash")

    def run_cudnn(q_, k_, v_):
        rep = h // hk
        return _Packed.apply(q_, k_.repeat_interleave(rep, 2), v_.repeat_interleave(rep, 2), "cudnn")

    def run_sdpa_rows(q_, k_, v_):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            o = torch.nn.functional.scaled_dot_product_attention(
                q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), is_causal=True, enable_gqa=True)
        return o.transpose(1, 2)

    class _Packed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q_, k_, v_, kind):
            qf, kf, vf = (x.reshape(b * t, x.shape[2], d) for x in (q_, k_, v_))
            if kind == "flash":
                o, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
                    qf, kf, vf, cu, cu, max_len, max_len, 0.0, True, False)
                ctx.extra = (rng, unused)
            else:
                r = torch.ops.aten._cudnn_attention_forward(qf, kf, vf, None, cu, cu, max_len, max_len, True,
                                                            0.0, True, False)
                o, lse = r[0], r[1]
                ctx.extra = (r[6], r[7])
            ctx.kind = kind
            ctx.save_for_backward(qf, kf, vf, o, lse)
            return o.view(b, t, h, d)

        @staticmethod
        def backward(ctx, go):
            qf, kf, vf, o, lse = ctx.saved_tensors
            gf = go.reshape(b * t, h, d).contiguous()
            if ctx.kind == "flash":
                rng, unused = ctx.extra
                dq, dk, dv = torch.ops.aten._flash_attention_backward(
                    gf, qf, kf, vf, o, lse, cu, cu, max_len, max_len, 0.0, True, rng, unused)
            else:
                seed, off = ctx.extra
                dq, dk, dv = torch.ops.aten._cudnn_attention_backward(
                    gf, qf, kf, vf, o, lse, seed, off, torch.empty(0, device=qf.device), cu, cu,
                    max_len, max_len, 0.0, True)
            return dq.view(b, t, -1, d), dk.view(b, t, -1, d), dv.view(b, t, -1, d), None

    def fwd_bwd(fn):
        qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
        o = fn(qq, kk, vv)
        o.backward(do)
        dk_, dv_ = kk.grad, vv.grad
        return o.detach(), qq.grad, dk_, dv_

    def fold(gr):   # a backend that expanded K, V: its dk, dv summed over each group
        return gr if gr.shape[2] == hk else gr.view(b, t, hk, h // hk, d).sum(3)

    rows, ref = [], None
    for name, fn in (("flex (model)", run_flex), ("flash-2 varlen", run_fa2), ("cudnn varlen", run_cudnn),
                     ("sdpa flash, whole rows", run_sdpa_rows)):
        try:
            o, dq, dk_, dv_ = fwd_bwd(fn)
            dk_, dv_ = fold(dk_), fold(dv_)
            if ref is None:
                ref = (o, dq, dk_, dv_)
            errs = [rel(x, r) for x, r in zip((o, dq, dk_, dv_), ref)]
            qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
            f_ms = cuda_time(lambda: fn(q, k, v), a.iters)
            fb_ms = cuda_time(lambda: fn(qq, kk, vv).backward(do), a.iters)
            row = dict(backend=name, fwd_ms=f_ms, fwd_bwd_ms=fb_ms, bwd_ms=fb_ms - f_ms,
                       err_o=errs[0], err_dq=errs[1], err_dk=errs[2], err_dv=errs[3])
            print(f"{name:24s} fwd {f_ms:6.3f} ms  fwd+bwd {fb_ms:6.3f} ms  (bwd {fb_ms - f_ms:6.3f})  "
                  f"vs flex: o {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}", flush=True)
        except Exception as e:  # a backend missing here: say why, go on
            row = dict(backend=name, error=f"{type(e).__name__}: {e}"[:400])
            print(f"{name:24s} failed: {row['error']}", flush=True)
            traceback.print_exc(limit=2)
        rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(shape=a.shape, documents=cu.numel() - 1, attended_fraction=frac, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
