"""Which gated RMSNorm runs: the Triton kernels or the pure-torch reference.

    gated_rms_norm_fast(x, z, weight, eps, group_size=None, norm_before_gate=False)

has `reference.gated_rms_norm`'s signature and result. It takes the Triton
kernels (`triton_gated_norm.gated_rms_norm_triton`) when
`gated_norm_backend(x.device, x.dtype, group_size)` says "triton": x on
CUDA, triton importable, MEGACPP_GATED_NORM not "reference", x not float64,
the group at most MAX_GROUP channels, and, unless MEGACPP_GATED_NORM=triton,
at most WIDE_GROUP channels. Everything else goes to the reference.
MEGACPP_GATED_NORM=triton makes a missing Triton path an error instead of a
silent fallback, and takes the kernels for wide groups too (for benchmarks).

Why WIDE_GROUP: on an H200 (2026-11-28, `benchmarks/gated_norm_bench.py
--sweep`, BENCHMARKS.md) the kernels beat the compiled reference at Gated
DeltaNet's heads of 128 channels (0.575 against 0.912 ms, forward and
backward) and lost to it at Mamba-2's one group of 1536 (1.02 at best
against 0.71) and of 4096 (1.24 against 1.04): there a program holds one or
two rows and spends its time in cross-warp row sums.
"""
from __future__ import annotations

import torch

from .._backend import KernelBackend, assume_constant, kernels_import_error
from .reference import gated_rms_norm as gated_norm_reference

ENV = "MEGACPP_GATED_NORM"
MAX_GROUP = 16384  # channels of one group the Triton kernels hold in registers
WIDE_GROUP = 512  # wider groups take the reference unless MEGACPP_GATED_NORM=triton (see above)


@assume_constant  # see _backend.assume_constant: dynamo bakes in the result
def triton_import_error() -> str:
    """'' when megacpp.ops.gated_norm.triton_gated_norm imports, else the reason (cached)."""
    return kernels_import_error(f"{__package__}.triton_gated_norm")


BACKEND = KernelBackend(ENV, "gated RMSNorm", f"{__package__}.triton_gated_norm", "gated_rms_norm_triton",
                        triton_import_error)


def gated_norm_backend_reason(device, dtype: torch.dtype | None = None, group_size: int | None = None) -> str:
    """'' if gated_rms_norm_fast runs the Triton kernels for tensors on `device` (of `dtype`), else why not."""
    limit = ""
    if group_size and group_size > MAX_GROUP:
        limit = f"group of {group_size} channels > {MAX_GROUP}"
    elif group_size and group_size > WIDE_GROUP and BACKEND.choice() != "triton":
        limit = (f"group of {group_size} channels > {WIDE_GROUP}: the compiled reference is faster "
                 f"there (H200); MEGACPP_GATED_NORM=triton forces the kernels")
    return BACKEND.reason(device, dtype, limit)


def gated_norm_backend(device, dtype: torch.dtype | None = None, group_size: int | None = None) -> str:
    """'triton' or 'reference': what gated_rms_norm_fast runs for tensors on `device` (of `dtype`)."""
    return BACKEND.backend(gated_norm_backend_reason(device, dtype, group_size))


def gated_rms_norm_fast(x, z, weight, eps, group_size=None, norm_before_gate=False):
    """reference.gated_rms_norm's signature; Triton on CUDA when available (see gated_norm_backend)."""
    if gated_norm_backend(x.device, x.dtype, group_size or x.shape[-1]) == "triton":
        from .triton_gated_norm import gated_rms_norm_triton
        return gated_rms_norm_triton(x, z, weight, eps, group_size, norm_before_gate)
    return gated_norm_reference(x, z, weight, eps, group_size, norm_before_gate)
