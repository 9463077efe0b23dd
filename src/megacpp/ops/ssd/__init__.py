"""Mamba-2 SSD ops: the pure-torch reference (chunked, recurrent, single-step),
the Triton chunked scan (`ssd_triton`, only where triton imports) and the
dispatcher `ssd_fast` with `ssd_backend` telling which of the two it runs."""
from .dispatch import ssd_backend, ssd_backend_reason, ssd_fast
from .reference import ssd, ssd_recurrent, ssd_step

__all__ = ["ssd", "ssd_recurrent", "ssd_step", "ssd_fast", "ssd_backend", "ssd_backend_reason"]


def __getattr__(name):
    # `ssd_triton` is imported on first access so that importing megacpp
    # never imports triton; without triton it is simply absent.
    from .dispatch import BACKEND
    return BACKEND.package_attr(__name__, name)
