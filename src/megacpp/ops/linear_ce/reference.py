"""Fused linear + cross-entropy reference that never materialises all logits.

    loss_i = logsumexp(W h_i) - (W h_i)[target_i]      (0 where target_i == ignore_index)

hidden (tokens, d), weight (vocab, d), target (tokens,) long. reduction is
"mean" (over non-ignored tokens, NaN when there are none, like
torch.nn.functional.cross_entropy), "sum", or "none" (per-token losses).

`linear_cross_entropy` processes chunk_size tokens at a time, so at most
chunk_size x vocab logits exist at once, in forward and in backward:
  * "mean"/"sum": the gradient of the scalar loss is known up to the
    upstream scalar, so forward computes it chunk by chunk
    (softmax - onehot) and backward only rescales it.
  * "none": the upstream gradient differs per token and is unknown in
    forward. Folding a per-token scale into a precomputed d_weight is
    impossible (d_weight sums over tokens), so forward keeps only the
    per-token logsumexp and backward recomputes each chunk's logits and
    weights every row by its own upstream gradient.
Logits are formed in float32 (float64 for float64 inputs); the loss is
returned in that dtype and gradients in the inputs' dtypes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._common import compute_dtype

_REDUCTIONS = ("mean", "sum", "none")


def _check(hidden, weight, target, reduction, chunk_size, ignore_index, values=True):
    """Shapes, dtypes, reduction, chunk size; with `values`, the targets against
    the vocab (a host sync: the Triton op skips it)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden must be (tokens, d) and weight (vocab, d), got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if target.shape != hidden.shape[:1]:
        raise ValueError(f"target must be ({hidden.shape[0]},), got {tuple(target.shape)}")
    if target.dtype != torch.long:
        raise ValueError(f"target must be int64, got {target.dtype}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not values:
        return
    live = target[target != ignore_index]
    if live.numel() and (live.min() < 0 or live.max() >= weight.shape[0]):
        raise ValueError(f"target values must lie in [0, {weight.shape[0]}) or equal ignore_index")


def _chunk_grad(logits, lse, tgt, row_scale):
    """Turn a logits chunk, in place, into d loss / d logits, rows scaled by row_scale."""
    grad = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits buffer
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad[rows, tgt] -= 1.0
    return grad.mul_(row_scale[:, None])


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, reduction, chunk_size, grads=True):
        cdt = compute_dtype(hidden, weight)
        n = hidden.shape[0]
        w = weight.to(cdt)  # one upcast copy of the weight, not one per chunk
        valid = target != ignore_index
        safe_t = target.masked_fill(~valid, 0)  # ignored rows gather a dummy column, then get zeroed
        validf = valid.to(cdt)
        # grads: grad mode was on at the call; under no_grad (evaluation) only the loss
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        eager = reduction != "none" and (need_h or need_w)

        losses = hidden.new_empty(n, dtype=cdt)
        lse_all = hidden.new_empty(n, dtype=cdt) if reduction == "none" else None
        d_hidden = hidden.new_zeros(hidden.shape, dtype=cdt) if eager and need_h else None
        d_weight = w.new_zeros(w.shape) if eager and need_w else None
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = hidden[s:e].to(cdt)
            logits = h @ w.T
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, safe_t[s:e, None]).squeeze(1)
            losses[s:e] = (lse - picked) * validf[s:e]
            if lse_all is not None:
                lse_all[s:e] = lse
            if eager:
                grad = _chunk_grad(logits, lse, safe_t[s:e], validf[s:e])
                if d_hidden is not None:
                    d_hidden[s:e] = grad @ w
                if d_weight is not None:
                    d_weight.addmm_(grad.T, h)
            del logits

        n_valid = valid.sum()
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, safe_t, validf, lse_all)
            out = losses
        else:
            if reduction == "mean":
                # 0/0 -> NaN with no valid token, matching F.cross_entropy; the
                # gradients are all zero then, so the clamp only avoids NaN grads.
                out = losses.sum() / n_valid
                inv = 1.0 / n_valid.clamp(min=1).to(cdt)
                if d_hidden is not None:
                    d_hidden.mul_(inv)
                if d_weight is not None:
                    d_weight.mul_(inv)
            else:
                out = losses.sum()
            ctx.save_for_backward(d_hidden, d_weight)
        ctx.reduction = reduction
        ctx.chunk_size = chunk_size
        ctx.cdt = cdt
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        h_dtype, w_dtype = ctx.dtypes
        if ctx.reduction != "none":
            d_hidden, d_weight = ctx.saved_tensors
            go = grad_out.to(ctx.cdt)
            dh = (d_hidden * go).to(h_dtype) if need_h else None
            dw = (d_weight * go).to(w_dtype) if need_w else None
            return dh, dw, None, None, None, None, None

        hidden, weight, safe_t, validf, lse_all = ctx.saved_tensors
        cdt = ctx.cdt
        w = weight.to(cdt)
        # Each token's row of d loss / d logits is scaled by its own upstream grad.
        # where(), not a product, so a non-finite upstream grad at an ignored
        # token still yields exactly zero there (as F.cross_entropy does).
        row_scale = torch.where(validf > 0, grad_out.to(cdt), 0.0)
        dh = hidden.new_empty(hidden.shape, dtype=cdt) if need_h else None
        dw = w.new_zeros(w.shape) if need_w else None
        n = hidden.shape[0]
        for s in range(0, n, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            h = hidden[s:e].to(cdt)
            grad = _chunk_grad(h @ w.T, lse_all[s:e], safe_t[s:e], row_scale[s:e])
            if dh is not None:
                dh[s:e] = grad @ w
            if dw is not None:
                dw.addmm_(grad.T, h)
            del grad
        return (
            dh.to(h_dtype) if dh is not None else None,
            dw.to(w_dtype) if dw is not None else None,
            None, None, None, None, None,
        )


def linear_cross_entropy(hidden, weight, target, ignore_index=-100, reduction="mean", chunk_size=4096):
    """Cross-entropy of `hidden @ weight.T` against `target`, chunk_size tokens at a time.

    Returns a scalar for "mean"/"sum" and a (tokens,) tensor for "none"
    (0 at ignored tokens). Differentiable in hidden and weight (once).
    """
    _check(hidden, weight, target, reduction, chunk_size, ignore_index)
    # The Function picks its own compute dtype; an enclosing autocast would
    # re-cast its in-place matmuls and mix dtypes.
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, target, ignore_index, reduction, chunk_size,
                                         torch.is_grad_enabled())


def linear_cross_entropy_naive(hidden, weight, target, ignore_index=-100, reduction="mean", chunk_size=4096):
    """Parity baseline: materialises all (tokens, vocab) logits. chunk_size is ignored."""
    _check(hidden, weight, target, reduction, chunk_size, ignore_index)
    cdt = compute_dtype(hidden, weight)
    logits = hidden.to(cdt) @ weight.to(cdt).T
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
