"""Activation checkpointing per block family, applied from outside the model.

"full" recomputes a whole layer (norm + sublayer) in backward; "selective"
recomputes only the sublayer (the norm output stays saved); "none" keeps
everything. The layer's `forward` attribute is replaced on the instance, so
module names and state-dict keys are unchanged.
"""
from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..recipe.pattern import FAMILY, FAMILY_KEY


def _wrap(module: torch.nn.Module) -> None:
    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: torch.nn.Module, letters: str, policy: dict[str, str]) -> dict:
    """Returns {layer index: mode} of what was applied."""
    applied = {}
    for i, letter in enumerate(letters):
        mode = policy[FAMILY_KEY[letter]]
        if mode == "none":
            continue
        layer = model.layers[i]
        target = layer if mode == "full" else getattr(layer, FAMILY[letter])
        _wrap(target)
        applied[i] = mode
    return applied
