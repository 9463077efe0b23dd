"""Gated delta rule reference ops (chunked, recurrent and single-step)."""
from .reference import gated_delta_rule, gated_delta_rule_recurrent, gated_delta_rule_step

__all__ = ["gated_delta_rule", "gated_delta_rule_recurrent", "gated_delta_rule_step"]
