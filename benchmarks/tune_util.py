"""What the Triton launch sweeps (ssd_tune.py, conv_tune.py) share: one
kernel's own time from torch.profiler, a relative error, and coordinate
descent over a kernel's launch options.

Coordinate descent: start from the defaults ({}), then for each option in
turn try each of its values with the others at the best so far, keeping a
value only if it is at least `gain` faster; two passes. `try_cfg(cfg)`
returns (ms, note) or (None, why) for a variant that failed to compile,
launch or match the defaults' outputs.
"""
from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kernel_ms(fn, kernel_name: str, reps: int = 5) -> float:
    """Mean time per call of fn() spent in kernels named `kernel_name` (CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    from megacpp.train.kernel_profile import device_events

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e - s for n, s, e in device_events(prof) if n == kernel_name) / 1e3 / reps


def coordinate_descent(options: dict[str, list], try_cfg, log: list, kernel: str,
                       passes: int = 2, gain: float = 0.98) -> dict:
    """{"config": best, "ms": its time, "default_ms": the defaults'}; every try appended to log."""
    best: dict = {}
    best_ms, note = try_cfg(best)
    log.append({"kernel": kernel, "config": {}, "ms": best_ms, "note": "default" if best_ms is not None else note})
    if best_ms is None:
        return {"config": {}, "ms": None, "default_ms": None}
    default_ms = best_ms
    for _ in range(passes):
        for key, values in options.items():
            for v in values:
                cfg = {**best, key: v}
                if cfg == best:
                    continue
                ms, note = try_cfg(cfg)
                log.append({"kernel": kernel, "config": cfg, "ms": ms,
                            "note": note if ms is None else f"err {note:.1e}"})
                if ms is not None and ms < best_ms * gain:
                    best, best_ms = cfg, ms
    return {"config": best, "ms": best_ms, "default_ms": default_ms}
