"""`dsa_indexer_fused`: DSA lightning-indexer top-k without the score tensor.

Replaces scoring every (query, key) pair into a (batch, seq, seq) float32
tensor (and a per-head one before the weighted sum) and then taking top-k:
the chunked op scores a block of queries at a time, accumulates the heads in
place and keeps only each query's running top-k. D-layer attention modules
call `self.indexer_topk_fn`; this patch sets it.
"""
from __future__ import annotations

import torch

import megacpp
from ..ops.dsa_index import indexer_topk, indexer_topk_naive
from .registry import Backend, ParityResult, Patch, register, rel_err

BACKENDS = {"chunked": indexer_topk}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def _dsa_modules(model):
    return [m for m in model.modules() if getattr(m, "indexer_topk_fn", None) is not None]


class DSAIndexerPatch(Patch):
    name = "dsa_indexer_fused"
    replaces = "DSA indexer scores as a (batch, seq, seq) float32 tensor, then top-k"

    def backends(self, device):
        return [Backend("chunked", True, version=f"megacpp {megacpp.__version__}")]

    def applicable(self, model):
        if not _dsa_modules(model):
            return False, "the model has no D (DSA) layers"
        return True, ""

    def install(self, model, backend):
        for m in _dsa_modules(model):
            m.indexer_topk_fn = BACKENDS[backend]

    def parity(self, device, dtype, backend, small=True):
        b, t, h, d, topk = (2, 96, 3, 16, 16) if small else (1, 2048, 4, 64, 256)
        q = torch.randn(b, t, h, d, device=device, dtype=dtype)
        k = torch.randn(b, t, d, device=device, dtype=dtype)
        w = torch.randn(b, t, h, device=device, dtype=dtype)
        i0, s0 = indexer_topk_naive(q, k, w, topk)
        i1, s1 = BACKENDS[backend](q, k, w, topk)
        valid = i0 >= 0
        # indices can differ only where scores tie within rounding; compare the scores
        errs = {"scores": rel_err(s1[valid].float(), s0[valid].float()),
                "index_mismatch_frac": float((i0 != i1).float().mean())}
        tol = TOLERANCE.get(dtype, 2e-2)
        ok = errs["scores"] <= tol and bool(((i1 >= 0) == valid).all())
        if dtype == torch.float32:
            ok = ok and errs["index_mismatch_frac"] <= 1e-3
        return ParityResult(ok, str(dtype).replace("torch.", ""), str(device), backend, errs, tol)


register(DSAIndexerPatch())
