"""Depthwise causal conv over time, document-masked: the pure-torch reference.

    causal_conv1d(x, weight, bias=None, doc_ids=None, activation=None, same_doc=None)
        -> y (batch, seqlen, channels) in x's dtype

x (batch, seqlen, channels); weight (channels, 1, K) as nn.Conv1d holds it;
bias (channels,) or None; doc_ids (batch, seqlen) segment ids of packed
documents or None; activation None or "silu".

    y_t = act(round(bias + sum_k weight[:, 0, K-1-k] * x_{t-k}))

where round is the cast to x's dtype. In packed rows the taps that reach
into an earlier document are dropped, so each document sees the zero left
padding it would see alone. The taps accumulate in the weights' dtype
(float32); the sum is rounded to x's dtype once, as autocast's conv1d
would give, and the activation is applied to that rounded value (its own
result rounded again). A float32 result would hand the Mamba and delta-rule
scans float32 operands, which their Triton kernels (custom ops, outside
autocast) then multiply on CUDA cores instead of tensor cores.

same_doc: a callable k -> (batch, seqlen) bool, "token t-k exists and is in
t's document" (SeqContext.same_doc, memoised across layers); by default
computed from doc_ids.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu")


def same_doc_mask(doc_ids: torch.Tensor, k: int) -> torch.Tensor:
    """(batch, seqlen) bool: token t-k exists and is in t's document."""
    t = doc_ids.shape[1]
    m = torch.zeros_like(doc_ids, dtype=torch.bool)
    if k == 0:
        m[:] = True
    elif k < t:
        m[:, k:] = doc_ids[:, k:] == doc_ids[:, :-k]
    return m


def check(x, weight, bias, doc_ids, activation) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, seqlen, channels), got {tuple(x.shape)}")
    c = x.shape[-1]
    if weight.dim() != 3 or weight.shape[0] != c or weight.shape[1] != 1:
        raise ValueError(f"causal_conv1d: weight must be ({c}, 1, K), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (c,):
        raise ValueError(f"causal_conv1d: bias must be ({c},), got {tuple(bias.shape)}")
    if doc_ids is not None and tuple(doc_ids.shape) != tuple(x.shape[:2]):
        raise ValueError(f"causal_conv1d: doc_ids must be {tuple(x.shape[:2])}, got {tuple(doc_ids.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation {activation!r} is not one of {ACTIVATIONS}")


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  doc_ids: torch.Tensor | None = None, activation: str | None = None,
                  same_doc=None) -> torch.Tensor:
    check(x, weight, bias, doc_ids, activation)
    b, t, c = x.shape
    K = weight.shape[-1]
    if doc_ids is None:
        y = F.conv1d(x.transpose(1, 2).to(weight.dtype), weight, bias, padding=K - 1, groups=c)[..., :t]
        y = y.transpose(1, 2).to(x.dtype)
    else:
        if same_doc is None:
            def same_doc(k):
                return same_doc_mask(doc_ids, k)
        w = weight[:, 0, :]  # (c, K); tap K-1 multiplies x_t
        y = x * w[:, K - 1]
        for k in range(1, K):
            if k >= t:
                break
            shifted = F.pad(x[:, :-k], (0, 0, k, 0))
            y = y + shifted * same_doc(k)[..., None].to(x.dtype) * w[:, K - 1 - k]
        if bias is not None:
            y = y + bias
        y = y.to(x.dtype)
    return F.silu(y) if activation == "silu" else y
