"""Mamba-2 SSD reference ops (chunked, recurrent and single-step)."""
from .reference import ssd, ssd_recurrent, ssd_step

__all__ = ["ssd", "ssd_recurrent", "ssd_step"]
