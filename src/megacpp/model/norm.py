"""Norms: the seam norms (RMSNorm or LayerNorm, per model.norm.kind) and the
weight-only RMSNorms used inside sublayers, including the gated form that
Mamba and Gated DeltaNet put on their outputs.

Statistics are taken in float32 whatever the activation dtype: a bf16 mean
of squares over a few thousand channels loses the digits the norm exists
to fix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.gated_norm import gated_rms_norm_fast


def fp(t: torch.Tensor) -> torch.Tensor:
    """Upcast half types to float32; float32 and float64 stay as they are
    (float64 models are how the tests check exactness)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = fp(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = fp(x)
        y = F.layer_norm(xf, (x.shape[-1],), self.weight.to(xf.dtype), self.bias.to(xf.dtype), self.eps)
        return y.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU gate, normalised in groups of `group_size` channels.

    norm_before_gate=False (Mamba-2's choice): y = norm(x * silu(z)) * w.
    norm_before_gate=True (Gated DeltaNet's output norm): y = norm(x) * w * silu(z).
    Grouping keeps the statistics per B/C group (Mamba-2) or per head, so a
    tensor-parallel split along groups would not change the function.
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"group_size {self.group_size} does not divide {dim}")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # one Triton pass forward and one backward on CUDA (ops/gated_norm);
        # the reference there is this module's math on CPU and in float64
        return gated_rms_norm_fast(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The seam / final norm named by model.norm.kind."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    raise ValueError(f"unknown norm kind {kind!r} (rmsnorm | layernorm)")
