"""Which causal conv runs: the Triton kernels or the pure-torch reference.

    causal_conv1d_fast(x, weight, bias=None, doc_ids=None, activation=None, same_doc=None)

has `reference.causal_conv1d`'s signature and result. It takes the Triton
kernels (`triton_conv.causal_conv1d_triton`: one pass forward, one backward,
the activation fused, nothing but the inputs saved) when
`conv_backend(x.device, x.dtype)` says "triton": x on CUDA, triton
importable, MEGACPP_CONV not "reference", x not float64. Everything else
goes to the reference. MEGACPP_CONV=triton makes a missing Triton path an
error instead of a silent fallback.
"""
from __future__ import annotations

import torch

from .._backend import KernelBackend, assume_constant, kernels_import_error
from .reference import causal_conv1d as conv_reference

ENV = "MEGACPP_CONV"


@assume_constant  # see _backend.assume_constant: dynamo bakes in the result
def triton_import_error() -> str:
    """'' when megacpp.ops.causal_conv.triton_conv imports, else the reason (cached)."""
    return kernels_import_error(f"{__package__}.triton_conv")


BACKEND = KernelBackend(ENV, "causal conv", f"{__package__}.triton_conv", "causal_conv1d_triton",
                        triton_import_error)


def conv_backend_reason(device, dtype: torch.dtype | None = None) -> str:
    """'' if causal_conv1d_fast runs the Triton kernels for tensors on `device` (of `dtype`), else why not."""
    return BACKEND.reason(device, dtype)


def conv_backend(device, dtype: torch.dtype | None = None) -> str:
    """'triton' or 'reference': what causal_conv1d_fast runs for tensors on `device` (of `dtype`)."""
    return BACKEND.backend(conv_backend_reason(device, dtype))


def causal_conv1d_fast(x, weight, bias=None, doc_ids=None, activation=None, same_doc=None):
    """reference.causal_conv1d's signature; Triton on CUDA when available (see conv_backend)."""
    if conv_backend(x.device, x.dtype) == "triton":
        from .triton_conv import causal_conv1d_triton
        return causal_conv1d_triton(x, weight, bias, doc_ids, activation)
    return conv_reference(x, weight, bias, doc_ids, activation, same_doc=same_doc)
