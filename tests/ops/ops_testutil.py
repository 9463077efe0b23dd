"""Helpers for tests/ops (module name kept unique: test dirs have no __init__.py)."""
from __future__ import annotations

import os
import subprocess
import sys

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


# ---------------------------------------------- Triton kernels vs reference

def err_norm_max(a: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
    """(||a - r|| / ||r||, max|a - r| / max|r|), r being the (float64) reference."""
    a, r = a.detach().double(), r.detach().double()
    d = a - r
    return (d.norm() / r.norm().clamp_min(1e-300)).item(), (d.abs().max() / r.abs().max().clamp_min(1e-300)).item()


def assert_errors_within(errs: dict, dtype: torch.dtype, tol: dict, own_key: str | None = None,
                         own_tol_fp32: tuple | None = None, show: bool = False) -> None:
    """Every (norm, max) in errs within tol[dtype]; errs[own_key] (if given)
    within own_tol_fp32 instead when dtype is float32. show: print the table."""
    tn, tm = tol[dtype]

    def bound(k):
        return own_tol_fp32 if (k == own_key and dtype == torch.float32) else (tn, tm)

    bad = {k: v for k, v in errs.items() if not (v[0] <= bound(k)[0] and v[1] <= bound(k)[1])}
    table = "\n".join(f"  {k:16s} norm {v[0]:.2e}  max {v[1]:.2e}" for k, v in errs.items())
    if show:
        print(f"{dtype}:\n{table}")
    assert not bad, f"{dtype}: tolerance norm {tn:g} / max {tm:g} exceeded by {sorted(bad)}\n{table}"


def run_interpreter_children(specs: list[tuple[str, str, int]]) -> None:
    """Run each test file's `cpu_interp` tests in ONE child pytest with
    TRITON_INTERPRET=1 (read when @triton.jit decorates the kernels, i.e. at
    their import) and every file's child variable set; specs: (test file,
    child variable, how many tests it must pass). Each file must pass exactly
    its count, nothing skipped or failed. One child, not one a file: each
    start costs ~5 s of imports on CI's two cores."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{var: "1" for _, var, _ in specs})
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    # (no hypothesis plugin: no interpreter test uses it, and its import is ~1 s of the child's start)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-o", "addopts=", "-p", "no:cacheprovider",
           "-p", "no:hypothesispytest", *[os.path.abspath(f) for f, _, _ in specs], "-k", "cpu_interp"]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1200)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    for f, _, n in specs:
        base = os.path.basename(f)
        got = sum(1 for line in out.splitlines() if line.startswith("PASSED ") and f"{base}::" in line)
        assert got == n, f"{base}: {got} interpreter tests passed, expected {n}\n{out[-3000:]}"
    total = sum(n for _, _, n in specs)
    assert f"{total} passed" in out and "skipped" not in out, out[-2000:]
