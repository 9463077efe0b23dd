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


def _keep_or_recompute(model: torch.nn.Module, kind: type, attr: str, mode: str, field: str) -> int:
    """Set `attr` (keep the kernel's intermediates for the backward) on every
    `kind` module from policy.kernels.<field>; returns how many it set."""
    if mode not in ("recompute", "keep"):
        raise ValueError(f"policy.kernels.{field} = {mode!r}: 'recompute' or 'keep'")
    mixers = [m for m in model.modules() if isinstance(m, kind)]
    for m in mixers:
        setattr(m, attr, mode == "keep")
    return len(mixers)


def apply_delta_states(model: torch.nn.Module, mode: str) -> int:
    """policy.kernels.delta_states onto every Gated DeltaNet mixer: "keep" the
    Triton delta rule's intermediates for the backward, or "recompute" them.
    Returns how many mixers it set (0 for a model without R layers)."""
    from ..model.recurrent import GatedDeltaNet
    return _keep_or_recompute(model, GatedDeltaNet, "keep_delta_states", mode, "delta_states")


def apply_ssd_states(model: torch.nn.Module, mode: str) -> int:
    """policy.kernels.ssd_states onto every Mamba mixer: "keep" the Triton
    scan's chunk states for the backward, or "recompute" them there. Returns
    how many mixers it set (0 for a model without Mamba layers)."""
    from ..model.mamba import _MambaBase
    return _keep_or_recompute(model, _MambaBase, "keep_ssd_states", mode, "ssd_states")


def apply_moe_wgrad_splits(model: torch.nn.Module, splits: int) -> int:
    """policy.kernels.moe_wgrad_splits onto every MoE layer's experts: their
    grouped weight gradient in `splits` parts per expert. Returns how many
    expert modules it set (0 for a model without E layers)."""
    from ..model.moe import Experts
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= 16:
        raise ValueError(f"policy.kernels.moe_wgrad_splits = {splits!r}: an integer from 1 to 16")
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    for m in experts:
        m.wgrad_splits = splits
    return len(experts)


def apply_kernel_policy(model: torch.nn.Module, kernels) -> None:
    """Every policy.kernels choice (a KernelSpec) onto the model's layers, as
    the trainer and the bench both do before compiling (read at trace time)."""
    apply_ssd_states(model, kernels.ssd_states)
    apply_delta_states(model, kernels.delta_states)
    apply_moe_wgrad_splits(model, kernels.moe_wgrad_splits)
    apply_mamba_in_proj(model, kernels.mamba_in_proj)
    apply_moe_gate(model, kernels.moe_gate)


def apply_moe_gate(model: torch.nn.Module, mode: str) -> int:
    """policy.kernels.moe_gate onto every MoE layer: "activation" scales each
    expert row's activation by its gate, "combine" weights the expert outputs
    where a token's slots are summed. Returns how many MoE layers take the
    gate in the activation (0 under "combine" or without E layers)."""
    from ..model.moe import MoE
    if mode not in ("combine", "activation"):
        raise ValueError(f"policy.kernels.moe_gate = {mode!r}: 'combine' or 'activation'")
    n = 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.gate_in_activation = mode == "activation"
            n += m.gate_in_activation
    return n


def moe_gate_layers(model: torch.nn.Module) -> int:
    """How many MoE layers scale the experts' activation by the gates (the record)."""
    from ..model.moe import MoE
    return sum(bool(m.gate_in_activation) for m in model.modules() if isinstance(m, MoE))


def apply_mamba_in_proj(model: torch.nn.Module, mode: str) -> int:
    """policy.kernels.mamba_in_proj onto every Mamba-2 mixer: "split" runs its
    in_proj as three GEMMs over row slices of the weight, "one" as one GEMM
    split after. Returns how many mixers run split (a converted, non-plain
    in_proj stays one GEMM and is not counted)."""
    from torch import nn
    from ..model.mamba import Mamba2
    if mode not in ("one", "split"):
        raise ValueError(f"policy.kernels.mamba_in_proj = {mode!r}: 'one' or 'split'")
    n = 0
    for m in model.modules():
        if isinstance(m, Mamba2):
            m.split_in_proj = mode == "split" and type(m.in_proj) is nn.Linear and m.in_proj.bias is None
            n += m.split_in_proj
    return n


def mamba_in_proj_split(model: torch.nn.Module) -> int:
    """How many Mamba-2 mixers take the split in_proj as wrapped now (after
    FSDP2: one sharded as its own group runs one GEMM)."""
    from ..model.mamba import Mamba2
    return sum(m.runs_split for m in model.modules() if isinstance(m, Mamba2))
