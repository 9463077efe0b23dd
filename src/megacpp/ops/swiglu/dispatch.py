"""Which SwiGLU runs: the Triton kernels or the pure-torch reference.

    swiglu_fast(h, scale=None)

has `reference.swiglu`'s signature and result. It takes the Triton kernels
(`triton_swiglu.swiglu_triton`) when `swiglu_backend(h.device, h.dtype)` says
"triton": h on CUDA, triton importable, h not float64 (MEASURED_FASTER: "auto"
takes them since the eighteenth session's A/B; MEGACPP_SWIGLU=reference not).
MEGACPP_SWIGLU=triton makes a missing Triton path an error instead of a
silent fallback.

Why: compiled, the reference's backward is one inductor kernel over
d(h) = [d gate | d up] whose two halves each load their inputs again (gate
and d(y) twice, up once: ~700 MB a nam-125m MoE layer per micro-batch, 0.20
ms on an H200, fourteenth session's profile); the kernels here load each
input once (~500 MB).
"""
from __future__ import annotations

import torch

from .._backend import KernelBackend, assume_constant, kernels_import_error
from .reference import swiglu as swiglu_reference

ENV = "MEGACPP_SWIGLU"


@assume_constant  # see _backend.assume_constant: dynamo bakes in the result
def triton_import_error() -> str:
    """'' when megacpp.ops.swiglu.triton_swiglu imports, else the reason (cached)."""
    return kernels_import_error(f"{__package__}.triton_swiglu")


BACKEND = KernelBackend(ENV, "SwiGLU", f"{__package__}.triton_swiglu", "swiglu_triton", triton_import_error)


# Measured against inductor's fusion of the reference on an H200: nam-125m
# +0.9% alone (fifteenth session), +2.0% with the experts' weight gradient in
# 4 parts in three alternating pairs (eighteenth); nam-1b -0.3%, within two
# runs' spread. "auto" takes them; MEGACPP_SWIGLU=reference the reference.
MEASURED_FASTER = True


def swiglu_backend_reason(device, dtype: torch.dtype | None = None) -> str:
    """'' if swiglu_fast runs the Triton kernels for tensors on `device` (of `dtype`), else why not."""
    limit = ""
    if not MEASURED_FASTER and BACKEND.choice() == "auto":
        limit = "not yet measured faster than the compiled reference on a GPU; MEGACPP_SWIGLU=triton takes the kernels"
    return BACKEND.reason(device, dtype, limit)


def swiglu_backend(device, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'reference': what swiglu_fast runs for tensors on `device` (of `dtype`)."""
    return BACKEND.backend(swiglu_backend_reason(device, dtype))


def swiglu_fast(h: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """reference.swiglu's signature; Triton on CUDA when available (see swiglu_backend)."""
    if swiglu_backend(h.device, h.dtype) == "triton":
        from .triton_swiglu import swiglu_triton
        return swiglu_triton(h, scale)
    return swiglu_reference(h, scale)
