"""One layer: explicit pre-norm seam -> sublayer -> residual add.

    x + f(norm(x))   when the family's seam is "pre"
    x + f(x)         when it is "none" (no norm module exists then)

The sublayer is registered under its family name (attention, mamba,
recurrent, moe, mlp), the names recipe/shapes.py lists. Every sublayer
answers forward(x, ctx) -> (y, aux, state) and step(x, state) -> (y, state);
aux is its per-forward stats (MoE, DSA) or None, state its decoding cache
(only when ctx.want_state).
"""
from __future__ import annotations

import torch
from torch import nn

from ..recipe.count import variant as recipe_variant
from ..recipe.pattern import FAMILY, FAMILY_KEY
from ..recipe.spec import ModelSpec
from .attention import build_attention
from .context import SeqContext
from .mamba import build_mamba
from .mlp import build_mlp
from .moe import MoE
from .norm import build_norm
from .recurrent import build_recurrent


def build_sublayer(spec: ModelSpec, letter: str) -> nn.Module:
    if letter in "AD":
        return build_attention(spec, dsa=letter == "D")
    if letter == "M":
        return build_mamba(spec)
    if letter == "R":
        return build_recurrent(spec)
    if letter == "E":
        return MoE(spec)
    if letter == "F":
        return build_mlp(spec)
    raise ValueError(f"unknown layer letter {letter!r}")


def variant_name(spec: ModelSpec, letter: str) -> str:
    """Short name of what a letter builds under this spec: the same string
    `megacpp describe` and the run manifest print (one definition, in recipe)."""
    return recipe_variant(spec, letter)


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, letter: str, key: int | str):
        super().__init__()
        self.letter, self.family, self.key = letter, FAMILY[letter], key
        self.seam = spec.norm.seams[FAMILY_KEY[letter]]
        self.norm = build_norm(spec.norm.kind, spec.hidden_size, spec.norm.eps) if self.seam == "pre" else None
        setattr(self, self.family, build_sublayer(spec, letter))

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.family)

    def init_weights(self, std: float, out_std: float) -> None:
        if self.norm is not None:
            self.norm.reset_parameters()
        self.mixer.init_weights(std, out_std)

    def forward(self, x: torch.Tensor, ctx: SeqContext):
        h = self.norm(x) if self.norm is not None else x
        y, aux, state = self.mixer(h, ctx)
        # the sum in the wider dtype, rounded once to the stream's (policy.precision.residual)
        return (x + y).to(x.dtype), aux, state

    def step(self, x: torch.Tensor, state):
        h = self.norm(x) if self.norm is not None else x
        y, state = self.mixer.step(h, state)
        return x + y, state
