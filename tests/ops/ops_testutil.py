"""Helpers for tests/ops (module name kept unique: test dirs have no __init__.py)."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class NumelRecorder(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active.

    Runs below autograd, so it also sees the ops inside custom
    autograd.Function forwards and backward passes.
    """

    def __init__(self):
        super().__init__()
        self.max_numel = 0
        self.biggest = None
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.max_numel:
                self.max_numel = t.numel()
                self.biggest = (str(func), tuple(t.shape))
        return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, b being the reference."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))
