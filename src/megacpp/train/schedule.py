"""Learning-rate schedules: linear warm-up, then cosine, WSD or constant."""
from __future__ import annotations

import math


def lr_at(step: int, total: int, base_lr: float, kind: str, warmup: int, min_ratio: float,
          decay_fraction: float) -> float:
    """lr for optimizer step `step` (0-based) of `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    floor = base_lr * min_ratio
    if kind == "constant":
        return base_lr
    if kind == "cosine":
        span = max(1, total - warmup)
        frac = min(1.0, (step - warmup) / span)
        return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if kind == "wsd":
        decay_steps = max(1, int(round(total * decay_fraction)))
        start = total - decay_steps
        if step < start:
            return base_lr
        frac = min(1.0, (step - start + 1) / decay_steps)
        return base_lr + (floor - base_lr) * frac
    raise ValueError(f"unknown schedule {kind!r}")
