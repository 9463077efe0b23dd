"""Which SSD implementation runs: the Triton kernels or the pure-torch reference.

    ssd_fast(x, dt, A, B, C, chunk_size, D=None, initial_state=None)

has `reference.ssd`'s signature and returns. It takes the Triton kernels
(`triton_ssd.ssd_triton`) when `ssd_backend(x.device, x.dtype)` says
"triton": x on CUDA, triton importable, the environment variable
MEGACPP_SSD not "reference", and x not float64 (the reference is the float64
oracle). Everything else goes to `reference.ssd`. MEGACPP_SSD=triton makes a
missing Triton path an error instead of a silent fallback.

Nothing here imports triton until a CUDA tensor asks for it, so importing
megacpp never needs triton.
"""
from __future__ import annotations

import os

import torch

from .reference import ssd as ssd_reference

ENV = "MEGACPP_SSD"
CHOICES = ("auto", "triton", "reference")

_TRITON_ERROR: str | None = None  # why `triton_ssd` cannot be imported ("" = it can)


def _assume_constant(fn):
    # Under torch.compile, dynamo calls fn eagerly and bakes in its result:
    # the first import of triton_ssd (which registers the custom ops) then
    # never happens inside a traced frame.
    deco = getattr(torch.compiler, "assume_constant_result", None)
    return deco(fn) if deco is not None else fn


@_assume_constant
def triton_import_error() -> str:
    """'' when megacpp.ops.ssd.triton_ssd imports, else the reason (cached)."""
    global _TRITON_ERROR
    if _TRITON_ERROR is None:
        try:
            from . import triton_ssd  # noqa: F401
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


def ssd_backend_reason(device, dtype: torch.dtype | None = None) -> str:
    """'' if ssd_fast runs the Triton kernels for tensors on `device` (of `dtype`), else why not."""
    device = torch.device(device)
    if _choice() == "reference":
        return f"disabled by {ENV}=reference"
    if device.type != "cuda":
        return "no CUDA" if not torch.cuda.is_available() else f"tensors on {device.type}, not CUDA"
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{dtype} inputs stay on the reference (kernels compute in float32)"
    err = triton_import_error()
    if err:
        return err if err == "triton missing" else f"triton kernels unavailable ({err})"
    return ""


def ssd_backend(device, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'reference': what ssd_fast runs for tensors on `device` (of `dtype`)."""
    why = ssd_backend_reason(device, dtype)
    if why and _choice() == "triton":
        raise RuntimeError(f"{ENV}=triton, but the Triton SSD cannot run: {why}")
    return "reference" if why else "triton"


def ssd_fast(x, dt, A, B, C, chunk_size, D=None, initial_state=None):
    """reference.ssd's signature; Triton on CUDA when available (see ssd_backend)."""
    if ssd_backend(x.device, x.dtype) == "triton":
        from .triton_ssd import ssd_triton
        return ssd_triton(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
    return ssd_reference(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)
