"""Gated RMSNorm (the output norm of Mamba-2/3 and Gated DeltaNet): the
pure-torch reference, the Triton kernels (`gated_rms_norm_triton`, only
where triton imports) and the dispatcher `gated_rms_norm_fast` with
`gated_norm_backend` telling which runs."""
from .dispatch import gated_norm_backend, gated_norm_backend_reason, gated_rms_norm_fast
from .reference import gated_rms_norm

__all__ = ["gated_rms_norm", "gated_rms_norm_fast", "gated_norm_backend", "gated_norm_backend_reason"]


def __getattr__(name):
    # `gated_rms_norm_triton` is imported on first access so that importing
    # megacpp never imports triton; without triton it is simply absent.
    from .dispatch import BACKEND
    return BACKEND.package_attr(__name__, name)
