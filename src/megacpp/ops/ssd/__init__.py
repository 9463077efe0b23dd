"""Mamba-2 SSD ops: the pure-torch reference (chunked, recurrent, single-step),
the Triton chunked scan (`ssd_triton`, only where triton imports) and the
dispatcher `ssd_fast` with `ssd_backend` telling which of the two it runs."""
from .dispatch import ssd_backend, ssd_backend_reason, ssd_fast
from .reference import ssd, ssd_recurrent, ssd_step

__all__ = ["ssd", "ssd_recurrent", "ssd_step", "ssd_fast", "ssd_backend", "ssd_backend_reason"]


def __getattr__(name):
    # `ssd_triton` is imported on first access so that importing megacpp
    # never imports triton; without triton it is simply absent.
    if name == "ssd_triton":
        from .dispatch import triton_import_error
        err = triton_import_error()
        if err:
            raise AttributeError(f"megacpp.ops.ssd.ssd_triton is unavailable: {err}")
        from .triton_ssd import ssd_triton
        return ssd_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
