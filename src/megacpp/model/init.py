"""Initialisation rules, one place, following the published models.

- Linear and embedding weights: normal(0, init_std) (GPT-2, Megatron,
  DeepSeek-V3 all draw from a small normal; the recipe names the std).
- Projections that write into the residual stream (attention o_proj, Mamba
  out_proj, recurrent o_proj, MLP / expert / shared-expert w_out): std
  init_std / sqrt(2 * depth), GPT-2's and Megatron's scaled init, so the
  residual stream's variance does not grow with depth (two writes per layer
  in the original; one sublayer per layer here, the published constant kept).
- Mamba (mamba_ssm): A_log = log(uniform[1, 16]); dt_bias = softplus^-1(dt)
  for dt log-uniform in [dt_min, dt_max] (floored at 1e-4); D = 1.
  Mamba-3's B/C biases start at 1 (mamba_ssm's Mamba3).
- Gated DeltaNet (fla): A_log and dt_bias drawn the same way.
- Depthwise convs keep PyTorch's default (kaiming-uniform), as mamba_ssm
  and fla do. Norm weights 1, norm biases 0.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def out_std(init_std: float, depth: int) -> float:
    return init_std / math.sqrt(2 * max(depth, 1))


def normal_(w: torch.Tensor, std: float) -> None:
    with torch.no_grad():
        nn.init.normal_(w, mean=0.0, std=std)


def a_log_(a_log: torch.Tensor, low: float = 1.0, high: float = 16.0) -> None:
    """A = -exp(A_log) with A_log = log(uniform[low, high])."""
    with torch.no_grad():
        a_log.copy_(torch.empty_like(a_log, dtype=torch.float32).uniform_(low, high).log())


def dt_bias_(dt_bias: torch.Tensor, dt_min: float, dt_max: float, floor: float = 1e-4) -> None:
    """dt_bias = inverse-softplus of dt, dt log-uniform in [dt_min, dt_max]."""
    with torch.no_grad():
        u = torch.rand_like(dt_bias, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
        # softplus^-1(y) = y + log(1 - exp(-y)), written with expm1 for small y
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def conv_default_(conv: nn.Conv1d) -> None:
    with torch.no_grad():
        conv.reset_parameters()
