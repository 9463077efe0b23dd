"""MoE auxiliary terms: switch load balance, router z-loss, bias balancing.

- load balance (Switch Transformer / GShard): E * sum_i f_i * P_i, with f_i
  the fraction of routed slots that chose expert i and P_i its mean router
  probability; 1.0 when perfectly balanced.
- z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.
- aux-loss-free balancing (DeepSeek-V3): after each step, each expert's
  selection bias moves by `rate` toward balance: +rate when it got fewer
  tokens than the mean, -rate when more. The bias only affects selection,
  never the gate weights, and is checkpointed as a buffer.
"""
from __future__ import annotations

import torch


def load_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """probs (tokens, E') router probabilities (E' may include null experts); topk_idx (tokens, k)."""
    tokens, k = topk_idx.shape
    counts = torch.zeros(probs.shape[-1], device=probs.device, dtype=torch.float32)
    counts.scatter_add_(0, topk_idx.reshape(-1), torch.ones(tokens * k, device=probs.device))
    f = counts[:num_experts] / max(tokens * k, 1)
    p = probs.float().mean(dim=0)[:num_experts]
    return num_experts * (f * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


@torch.no_grad()
def bias_update(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """In place: load (E,) token counts of the step."""
    load = load.float()
    bias.add_(rate * torch.sign(load.mean() - load))
