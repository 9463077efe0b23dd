"""Depthwise causal conv over time with document masking (the short conv in
front of the Mamba-2 and gated-delta-rule scans): the pure-torch reference,
the Triton kernels (`causal_conv1d_triton`, only where triton imports) and
the dispatcher `causal_conv1d_fast` with `conv_backend` telling which runs."""
from .dispatch import causal_conv1d_fast, conv_backend, conv_backend_reason
from .reference import causal_conv1d, same_doc_mask

__all__ = ["causal_conv1d", "same_doc_mask", "causal_conv1d_fast", "conv_backend", "conv_backend_reason"]


def __getattr__(name):
    # `causal_conv1d_triton` is imported on first access so that importing
    # megacpp never imports triton; without triton it is simply absent.
    from .dispatch import BACKEND
    return BACKEND.package_attr(__name__, name)
