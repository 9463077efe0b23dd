"""Dense feed-forward (layer letter F) and the activations shared with the MoE experts.

Gated activations (swiglu, geglu) take a w_in of twice the FFN width and
split it as [gate | up]: act(gate) * up (Shazeer, "GLU Variants Improve
Transformer"). gelu and relu2 (Primer's squared ReLU) use one half.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.swiglu import swiglu_fast
from ..ops.swiglu.reference import check_scale, scale_rows
from ..recipe.spec import ModelSpec
from . import init as winit

GATED = ("swiglu", "geglu")


def is_gated(activation: str) -> bool:
    return activation in GATED


def activate(h: torch.Tensor, activation: str, scale: torch.Tensor | None = None) -> torch.Tensor:
    """h (..., up * ffn) -> (..., ffn). SwiGLU through ops.swiglu: its reference
    (the expression the other gated activations use) or its Triton kernels
    where ops.swiglu.swiglu_backend picks them. scale (h.shape[:-1]), if
    given, multiplies each row of the result (the MoE's gates under
    policy.kernels.moe_gate = "activation"), in float32, rounded once."""
    if activation == "swiglu":
        return swiglu_fast(h, scale)
    check_scale(h, scale)
    if activation == "geglu":
        gate, up = h.chunk(2, dim=-1)
        return scale_rows(F.gelu(gate) * up, scale)
    if activation == "gelu":
        return scale_rows(F.gelu(h), scale)
    if activation == "relu2":
        return scale_rows(F.relu(h).square(), scale)
    raise ValueError(f"unknown activation {activation!r} (swiglu | geglu | gelu | relu2)")


class MLP(nn.Module):
    def __init__(self, d: int, ffn: int, activation: str):
        super().__init__()
        self.activation = activation
        up = 2 if is_gated(activation) else 1
        self.w_in = nn.Linear(d, up * ffn, bias=False)
        self.w_out = nn.Linear(ffn, d, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        winit.normal_(self.w_in.weight, std)
        winit.normal_(self.w_out.weight, out_std)

    def forward(self, x: torch.Tensor, ctx=None):
        return self.w_out(activate(self.w_in(x), self.activation)), None, None

    def step(self, x: torch.Tensor, state=None):
        return self.forward(x)[0], None


def build_mlp(spec: ModelSpec) -> MLP:
    return MLP(spec.hidden_size, spec.ffn_size, spec.activation)
