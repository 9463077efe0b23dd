"""`linear_ce`: output projection + cross-entropy without full logits.

Replaces `F.cross_entropy(hidden @ W.T, target)`, which holds a (tokens,
vocab) float32 logits tensor and its gradient (6 GiB at 16k tokens and vocab
32768, FACTS §3). Backends, best first (ORDER): the project's Triton op
(CUDA: 4096-token chunks, GEMMs in the autocast dtype,
`ops/linear_ce/triton_linear_ce.py`), Liger's fused linear cross-entropy
(CUDA, when liger-kernel is installed) and the chunked reference
(`megacpp.ops.linear_ce`, any device). MEGACPP_LINEAR_CE=triton|liger|chunked
forces one (A/B runs). The model calls `model.lm_loss_fn`,
which this patch sets; without the patch it is the plain path.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from functools import partial

import torch
import torch.nn.functional as F

from ..ops.linear_ce import linear_cross_entropy
from .registry import Backend, ParityResult, Patch, register, rel_err

IGNORE = -100


def plain_linear_ce(hidden, weight, target, ignore_index=IGNORE, reduction="mean"):
    """The unpatched path: full logits, then cross-entropy."""
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction=reduction)


def _liger_version() -> str | None:
    try:
        return importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        return None


def liger_linear_ce(hidden, weight, target, ignore_index=IGNORE, reduction="mean"):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)
    return fn(weight, hidden, target)


def chunked_linear_ce(hidden, weight, target, ignore_index=IGNORE, reduction="mean", chunk_size=4096):
    return linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index,
                                reduction=reduction, chunk_size=chunk_size)


def triton_linear_ce(hidden, weight, target, ignore_index=IGNORE, reduction="mean", chunk_size=4096):
    from ..ops.linear_ce.triton_linear_ce import linear_cross_entropy_triton
    return linear_cross_entropy_triton(hidden, weight, target, ignore_index=ignore_index,
                                       reduction=reduction, chunk_size=chunk_size)


BACKENDS = {"liger": liger_linear_ce, "triton": triton_linear_ce, "chunked": chunked_linear_ce}
# Best first, where no backend is forced. The Triton op before Liger's: nam-125m's
# head under autocast 13.36 -> 9.77 ms (forward + backward), its step at two
# micro-batches 349,702 -> 369,344 tokens/s (H200, 2026-11-28, BENCHMARKS.md).
ORDER = ("triton", "liger", "chunked")
# Relative-error tolerances of the parity check, per compute dtype: float32
# sums in a different order; bf16 inputs round each logit to ~3 digits.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float64: 1e-10}


class LinearCEPatch(Patch):
    name = "linear_ce"
    replaces = "output head logits + F.cross_entropy (tokens x vocab float32 logits)"

    def backends(self, device):
        import megacpp
        v = _liger_version()
        if device.type != "cuda":
            liger = Backend("liger", False, "needs CUDA (Triton kernels)")
        elif v is None:
            liger = Backend("liger", False, "liger-kernel not installed")
        else:
            liger = Backend("liger", True, version=v)
        if device.type != "cuda":
            tri = Backend("triton", False, "needs CUDA")
        elif importlib.util.find_spec("triton") is None:
            tri = Backend("triton", False, "triton not installed")
        else:
            tri = Backend("triton", True, version=f"megacpp {megacpp.__version__}")
        found = {"liger": liger, "triton": tri,
                 "chunked": Backend("chunked", True, version=f"megacpp {megacpp.__version__}")}
        forced = os.environ.get("MEGACPP_LINEAR_CE") or None
        if forced is not None:
            if forced not in BACKENDS:
                raise ValueError(f"MEGACPP_LINEAR_CE={forced!r}: expected one of {sorted(BACKENDS)}")
            for name, b in found.items():
                if name != forced and b.available:
                    found[name] = Backend(name, False, f"MEGACPP_LINEAR_CE={forced}")
        return [found[n] for n in ORDER]

    def install(self, model, backend):
        model.lm_loss_fn = BACKENDS[backend]
        model.lm_loss_backend = backend

    def parity(self, device, dtype, backend, small=True):
        """The backend against the plain path; a backend that raises (a Triton it
        cannot compile with, a library error) fails the check with the error as
        its detail, so a "preferred" patch falls back instead of stopping the run."""
        try:
            return self._parity(device, dtype, backend, small)
        except Exception as e:  # noqa: BLE001 - any failure of the backend is a failed check
            return ParityResult(False, str(dtype).replace("torch.", ""), str(device), backend,
                                detail=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")

    def _parity(self, device, dtype, backend, small=True):
        tokens, d, vocab = (256, 64, 1000) if small else (4096, 1024, 32768)
        g = torch.Generator(device="cpu").manual_seed(torch.seed() % (2**31))
        h0 = torch.randn(tokens, d, generator=g).to(device, dtype)
        w0 = (torch.randn(vocab, d, generator=g) * d ** -0.5).to(device, dtype)
        tgt = torch.randint(0, vocab, (tokens,), generator=g).to(device)
        tgt[::7] = IGNORE
        errs = {}
        for reduction in ("mean", "none"):
            outs = []
            up = torch.randn(tokens, generator=g).to(device) if reduction == "none" else None
            for fn in (plain_linear_ce, partial(BACKENDS[backend])):
                h = h0.clone().requires_grad_()
                w = w0.clone().requires_grad_()
                loss = fn(h, w, tgt, reduction=reduction)
                (loss.float() * up).sum().backward() if up is not None else loss.backward()
                outs.append((loss.detach().float(), h.grad.float(), w.grad.float()))
            (l0, gh0, gw0), (l1, gh1, gw1) = outs
            errs[f"{reduction}.loss"] = rel_err(l1, l0)
            errs[f"{reduction}.d_hidden"] = rel_err(gh1, gh0)
            errs[f"{reduction}.d_weight"] = rel_err(gw1, gw0)
        tol = TOLERANCE.get(dtype, 2e-2)
        ok = all(e <= tol for e in errs.values())
        return ParityResult(ok, str(dtype).replace("torch.", ""), str(device), backend, errs, tol)


register(LinearCEPatch())
