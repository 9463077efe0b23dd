"""SwiGLU (silu(gate) * up): the pure-torch reference, the Triton kernels
(`swiglu_triton`, only where triton imports) and the dispatcher `swiglu_fast`
with `swiglu_backend` telling which runs."""
from .dispatch import swiglu_backend, swiglu_backend_reason, swiglu_fast
from .reference import swiglu

__all__ = ["swiglu", "swiglu_fast", "swiglu_backend", "swiglu_backend_reason"]


def __getattr__(name):
    # `swiglu_triton` is imported on first access so that importing megacpp
    # never imports triton; without triton it is simply absent.
    from .dispatch import BACKEND
    return BACKEND.package_attr(__name__, name)
