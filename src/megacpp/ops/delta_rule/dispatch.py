"""Which gated delta rule runs: the Triton kernels or the pure-torch reference.

    gated_delta_rule_fast(q, k, v, g, beta, initial_state=None, chunk_size=64, scale=None)

has `reference.gated_delta_rule`'s signature and returns. It takes the
Triton kernels (`triton_delta_rule.gated_delta_rule_triton`) when
`delta_rule_backend(q.device, q.dtype)` says "triton": q on CUDA, triton
importable, the environment variable MEGACPP_DELTA_RULE not "reference",
q not float64 (the reference is the float64 oracle) and chunk_size within
the kernels' limit. Everything else goes to `reference.gated_delta_rule`.
MEGACPP_DELTA_RULE=triton makes a missing Triton path an error instead of a
silent fallback.

Nothing here imports triton until a CUDA tensor asks for it, so importing
megacpp never needs triton.
"""
from __future__ import annotations

import os

import torch

from .reference import gated_delta_rule as gated_delta_rule_reference

ENV = "MEGACPP_DELTA_RULE"
CHOICES = ("auto", "triton", "reference")
# The kernels' limits (triton_delta_rule imports them from here, so this
# module can state them without importing triton): C x C tiles and a
# dk x BV state block live in registers.
MAX_CHUNK = 128
MAX_DK = 256

_TRITON_ERROR: str | None = None  # why `triton_delta_rule` cannot be imported ("" = it can)


def _assume_constant(fn):
    # Under torch.compile, dynamo calls fn eagerly and bakes in its result:
    # the first import of triton_delta_rule (which registers the custom ops)
    # then never happens inside a traced frame.
    deco = getattr(torch.compiler, "assume_constant_result", None)
    return deco(fn) if deco is not None else fn


@_assume_constant
def triton_import_error() -> str:
    """'' when megacpp.ops.delta_rule.triton_delta_rule imports, else the reason (cached)."""
    global _TRITON_ERROR
    if _TRITON_ERROR is None:
        try:
            from . import triton_delta_rule  # noqa: F401
            _TRITON_ERROR = ""
        except ModuleNotFoundError as e:
            _TRITON_ERROR = "triton missing" if e.name == "triton" else f"{type(e).__name__}: {e}"
        except Exception as e:  # a triton too old for the kernels, ...
            _TRITON_ERROR = f"{type(e).__name__}: {e}"
    return _TRITON_ERROR


def _choice() -> str:
    forced = os.environ.get(ENV, "").strip().lower() or "auto"
    if forced not in CHOICES:
        raise ValueError(f"{ENV}={forced!r}: expected one of {CHOICES}")
    return forced


def delta_rule_backend_reason(device, dtype: torch.dtype | None = None, chunk_size: int | None = None,
                              dk: int | None = None) -> str:
    """'' if gated_delta_rule_fast runs the Triton kernels for tensors on `device` (of `dtype`), else why not."""
    device = torch.device(device)
    if _choice() == "reference":
        return f"disabled by {ENV}=reference"
    if device.type != "cuda":
        return "no CUDA" if not torch.cuda.is_available() else f"tensors on {device.type}, not CUDA"
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{dtype} inputs stay on the reference (kernels compute in float32)"
    if chunk_size is not None and not 1 <= chunk_size <= MAX_CHUNK:
        return f"chunk_size {chunk_size} outside the kernels' [1, {MAX_CHUNK}]"
    if dk is not None and dk > MAX_DK:
        return f"dk {dk} > {MAX_DK}"
    err = triton_import_error()
    if err:
        return err if err == "triton missing" else f"triton kernels unavailable ({err})"
    return ""


def delta_rule_backend(device, dtype: torch.dtype | None = None, chunk_size: int | None = None,
                       dk: int | None = None) -> str:
    """'triton' or 'reference': what gated_delta_rule_fast runs for tensors on `device` (of `dtype`)."""
    why = delta_rule_backend_reason(device, dtype, chunk_size, dk)
    if why and _choice() == "triton":
        raise RuntimeError(f"{ENV}=triton, but the Triton gated delta rule cannot run: {why}")
    return "reference" if why else "triton"


def gated_delta_rule_fast(q, k, v, g, beta, initial_state=None, chunk_size=64, scale=None):
    """reference.gated_delta_rule's signature; Triton on CUDA when available (see delta_rule_backend)."""
    if delta_rule_backend(q.device, q.dtype, chunk_size, q.shape[-1]) == "triton":
        from .triton_delta_rule import gated_delta_rule_triton
        return gated_delta_rule_triton(q, k, v, g, beta, initial_state, chunk_size=chunk_size, scale=scale)
    return gated_delta_rule_reference(q, k, v, g, beta, initial_state, chunk_size=chunk_size, scale=scale)
