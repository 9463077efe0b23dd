"""Which SSD implementation runs: the Triton kernels or the pure-torch reference.

    ssd_fast(x, dt, A, B, C, chunk_size, D=None, initial_state=None, starts=None, keep_states=False)

has `reference.ssd`'s signature and returns. It takes the Triton kernels
(`triton_ssd.ssd_triton`) when `ssd_backend(x.device, x.dtype)` says
"triton": x on CUDA, triton importable, the environment variable
MEGACPP_SSD not "reference", and x not float64 (the reference is the float64
oracle). Everything else goes to `reference.ssd`. keep_states (Triton only:
keep the forward's chunk states for the backward instead of recomputing
them) changes no result; the reference's autograd keeps what it keeps. MEGACPP_SSD=triton makes a
missing Triton path an error instead of a silent fallback.

Nothing here imports triton until a CUDA tensor asks for it, so importing
megacpp never needs triton.
"""
from __future__ import annotations

import torch

from .._backend import CHOICES  # noqa: F401  (re-exported: the values of ENV)
from .._backend import KernelBackend, assume_constant, autocast_operands, kernels_import_error
from .reference import ssd as ssd_reference

ENV = "MEGACPP_SSD"


@assume_constant  # see _backend.assume_constant: dynamo bakes in the result
def triton_import_error() -> str:
    """'' when megacpp.ops.ssd.triton_ssd imports, else the reason (cached)."""
    return kernels_import_error(f"{__package__}.triton_ssd")


BACKEND = KernelBackend(ENV, "SSD", f"{__package__}.triton_ssd", "ssd_triton", triton_import_error)


def ssd_backend_reason(device, dtype: torch.dtype | None = None) -> str:
    """'' if ssd_fast runs the Triton kernels for tensors on `device` (of `dtype`), else why not."""
    return BACKEND.reason(device, dtype)


def ssd_backend(device, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'reference': what ssd_fast runs for tensors on `device` (of `dtype`)."""
    return BACKEND.backend(ssd_backend_reason(device, dtype))


def ssd_fast(x, dt, A, B, C, chunk_size, D=None, initial_state=None, starts=None, keep_states=False):
    """reference.ssd's signature; Triton on CUDA when available (see ssd_backend)."""
    if ssd_backend(x.device, x.dtype) == "triton":
        from .triton_ssd import ssd_triton
        x, B, C = autocast_operands(x.device, x, B, C)  # the matmul operands, as the reference's einsums get them
        return ssd_triton(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state, starts=starts,
                          keep_states=keep_states)
    return ssd_reference(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state, starts=starts,
                         keep_states=keep_states)
