"""Helpers shared by the reference ops."""
from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any floating input is float64, else float32.

    Half inputs are upcast so the references stay usable as oracles for
    bf16/fp16 kernels; float64 is kept so tests can check to ~1e-12.
    """
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


# Log-decay written at document starts. exp(-1e4) is exactly 0 in float32
# and float64, so no state crosses the boundary; a finite value (not -inf)
# keeps every product in the chunked kernels and their gradients finite.
RESET_LOG_DECAY = -1.0e4


def pad_seq(t: torch.Tensor, pad: int, dim: int = 1) -> torch.Tensor:
    """Zero-pad `t` by `pad` entries at the end of dimension `dim`."""
    if pad == 0:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Segment sums of log decays: out[..., i, j] = sum(a[..., j+1 : i+1]).

    Lower triangle (i >= j) holds the sums (0 on the diagonal), the upper
    triangle is -inf so exp(out) is the causal decay matrix. The sums are
    cumulated directly over the masked entries rather than taken as
    differences of one prefix sum, which would cancel catastrophically
    once the prefix sums grow large in magnitude.
    """
    t = a.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    # rows k, columns j: keep a[k] where k > j, then sum down the rows.
    x = a.unsqueeze(-1).expand(*a.shape, t)
    x = x.masked_fill(~strict, 0.0)
    out = x.cumsum(dim=-2)
    causal = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~causal, float("-inf"))
