"""What the Triton launch sweeps (ssd_tune.py, conv_tune.py) share: one
kernel's own time from torch.profiler, a relative error, coordinate
descent over a kernel's launch options, and the driver (`sweep`) that
tunes each kernel of a module, checks every variant against the default
launch's outputs, and times the choice end to end at several shapes.

Coordinate descent: start from the defaults ({}), then for each option in
turn try each of its values with the others at the best so far, keeping a
value only if it is at least `gain` faster; two passes. `try_cfg(cfg)`
returns (ms, note) or (None, why) for a variant that failed to compile,
launch or match the defaults' outputs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch

from kernel_check_util import cuda_time  # this folder: the sweeps run as benchmarks/*.py


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


# ------------------------------------------------------------------ the sweep driver

@dataclass
class Target:
    """One Triton module's launch sweep: its tables and how to run it.

    module: has KERNELS, TUNED and LAUNCH (dicts of kernel -> launch keywords);
    options: kernel -> option -> values tried; kernel_names: kernel -> the
    name the profiler shows; make_inputs(shape, seed); fwd_bwd(inputs) ->
    the output tensors compared between variants.
    """
    title: str
    shape_doc: str          # the names of a shape's comma-separated sizes, "batch,seqlen,..."
    module: object
    options: dict
    kernel_names: dict
    make_inputs: Callable
    fwd_bwd: Callable

    def parse_shape(self, s: str) -> tuple[int, ...]:
        names = self.shape_doc.split(",")
        try:
            v = tuple(int(x) for x in s.split(","))
        except ValueError:
            v = ()
        if len(v) != len(names):
            raise SystemExit(f"shape {s!r}: expected {self.shape_doc} (integers)")
        return v


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def total_ms(fn, reps: int = 20) -> float:
    """Median time of fn() after 3 warm-up calls (CUDA events)."""
    return cuda_time(fn, reps)


def try_config(t: Target, inputs, ref, name: str, cfg: dict, tol: float, timer=kernel_ms):
    """(kernel ms, worst rel. error) of launching kernel `name` with `cfg`, or (None, why)."""
    t.module.LAUNCH[name] = dict(cfg)
    try:
        out = t.fwd_bwd(inputs)
        _sync()
        err = max(rel(o, r) for o, r in zip(out, ref))
        if not err <= tol:
            return None, f"mismatch {err:.2e}"
        return timer(lambda: t.fwd_bwd(inputs), t.kernel_names[name]), err
    except Exception as e:  # noqa: BLE001 - a variant that does not compile or launch is dropped
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    finally:
        t.module.LAUNCH[name] = {}


def sweep(t: Target, tune_shape: str, shapes: list[str], kernels: list[str], tol: float,
          json_path: str | None = None, timer=kernel_ms, total=total_ms) -> dict:
    """Tune each kernel at tune_shape, then time defaults against the choice at
    every shape; print a table and the TUNED line; return (and write) it all."""
    mod = t.module
    for k in mod.KERNELS:  # start from the defaults, not an earlier sweep's choice
        mod.TUNED[k] = {}
        mod.LAUNCH[k] = {}
    inputs = t.make_inputs(t.parse_shape(tune_shape), 0)
    ref = t.fwd_bwd(inputs)
    log: list = []
    chosen = {}
    for name in kernels:
        res = coordinate_descent(t.options[name], lambda cfg: try_config(t, inputs, ref, name, cfg, tol, timer),
                                 log, name)
        chosen[name] = res
        if res["ms"] is None:
            print(f"{name:10} the default launch failed: {log[-1]['note']}", flush=True)
        else:
            print(f"{name:10} default {res['default_ms']:7.3f} ms -> {res['ms']:7.3f} ms  {res['config']}",
                  flush=True)
    rows = []
    for s in shapes:
        inp = t.make_inputs(t.parse_shape(s), 1)
        base_out = t.fwd_bwd(inp)
        base = total(lambda: t.fwd_bwd(inp))
        for k, v in chosen.items():
            mod.LAUNCH[k] = dict(v["config"])
        try:
            err = max(rel(o, r) for o, r in zip(t.fwd_bwd(inp), base_out))
            tuned = total(lambda: t.fwd_bwd(inp))
        finally:
            for k in mod.KERNELS:
                mod.LAUNCH[k] = {}
        rows.append({"shape": s, "default_ms": base, "tuned_ms": tuned, "speedup": base / tuned, "max_rel_err": err})
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{t.title} on {device}; tuned at {tune_shape}")
    print(f"{'shape':24} {'default ms':>10} {'tuned ms':>9} {'speedup':>8} {'max rel err':>12}")
    for r in rows:
        print(f"{r['shape']:24} {r['default_ms']:10.3f} {r['tuned_ms']:9.3f} {r['speedup']:8.2f} "
              f"{r['max_rel_err']:12.1e}")
    print("TUNED = " + json.dumps({k: v["config"] for k, v in chosen.items()}))
    out = {"device": device, "tune_shape": tune_shape, "chosen": chosen, "rows": rows, "log": log}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=1)
    return out


def tune_main(target: Target, argv, name: str, tune_shape: str, shapes: list[str], options: dict) -> int:
    """The command line of a kernel module's sweep (ssd_tune.py, delta_tune.py):
    --tune-shape, --shapes, --kernels (default all of `options`), --tol, --json."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog=name, description=f"{target.title}: launch sweep")
    ap.add_argument("--tune-shape", default=tune_shape, help=f"{target.shape_doc} of the layer tuned at")
    ap.add_argument("--shapes", nargs="+", default=shapes, help="shapes the chosen set is timed at")
    ap.add_argument("--kernels", nargs="+", default=list(options), choices=list(options))
    ap.add_argument("--tol", type=float, default=2e-3, help="largest relative difference from the defaults")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU", file=sys.stderr)
        return 2
    sweep(target, args.tune_shape, args.shapes, args.kernels, args.tol, args.json)
    return 0

