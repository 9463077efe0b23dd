"""MoE auxiliary terms: switch load balance, router z-loss, bias balancing.

- load balance (Switch Transformer / GShard): E * sum_i f_i * P_i, with f_i
  the fraction of routed slots that chose expert i and P_i its mean router
  probability; 1.0 when perfectly balanced.
- z-loss (ST-MoE): mean over tokens of logsumexp(router logits)^2.
- aux-loss-free balancing (DeepSeek-V3) lives with the router
  (`model.moe.MoE.update_bias`); the trainer calls it after each step with
  the step's load, summed over micro-batches (and ranks).
"""
from __future__ import annotations

import torch


def load_balance_loss(mean_probs: torch.Tensor, load: torch.Tensor, num_experts: int) -> torch.Tensor:
    """mean_probs (R,) mean per-token-normalised router probabilities (differentiable);
    load (R,) assignments per router row. Rows beyond num_experts (null experts)
    are left out: routing to a no-op expert is not an imbalance."""
    f = load[:num_experts].float() / load.float().sum().clamp_min(1.0)
    return num_experts * (f.detach() * mean_probs[:num_experts].float()).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def moe_aux_terms(routers) -> tuple[torch.Tensor, torch.Tensor]:
    """(load balance, z-loss), each the mean over the E layers' RouterStats of
    the term the layer computed in its forward (RouterStats.balance, .z_sq:
    load_balance_loss and z_loss above, fused there by a compiled model)."""
    return (torch.stack([r.balance for r in routers]).mean(),
            torch.stack([r.z_sq for r in routers]).mean())
