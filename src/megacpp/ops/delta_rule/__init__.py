"""Gated delta rule ops: the pure-torch reference (chunked, recurrent and
single-step), the Triton chunked kernels (`gated_delta_rule_triton`, only
where triton imports) and the dispatcher `gated_delta_rule_fast` with
`delta_rule_backend` telling which of the two it runs."""
from .dispatch import delta_rule_backend, delta_rule_backend_reason, gated_delta_rule_fast
from .reference import gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_recurrent", "gated_delta_rule_step",
           "gated_delta_rule_fast", "delta_rule_backend", "delta_rule_backend_reason"]


def __getattr__(name):
    # `gated_delta_rule_triton` is imported on first access so that importing megacpp
    # never imports triton; without triton it is simply absent.
    from .dispatch import BACKEND
    return BACKEND.package_attr(__name__, name)
