"""Where a step's GPU time goes: kernels read off torch.profiler.

`profile_kernels(fn, reps)` runs `fn` `reps` times under the profiler and
returns a `KernelProfile`: the wall time, the summed kernel time, the time
the GPU was busy at all (the union of kernel intervals, so overlapping
streams count once) and the kernels grouped by name and by kind. A GPU
busy well below the wall means the host, not the kernels, sets the pace
(launch overhead: what CUDA graphs remove); kernel time well above the busy
time means streams overlapped.

Kinds, from the kernel's name:
  gemm        cuBLAS / CUTLASS / cuDNN matmuls (nvjet, xmma, gemm, wgmma)
  attention   flash / cuDNN attention and FlexAttention's Triton templates
  triton      hand-written Triton kernels, named `_name_kernel`: this
              project's ops (ops/*), or a peer's (mamba_ssm's SSD and norms)
  fused       inductor's generated elementwise / reduction kernels
  comm        NCCL collectives (all-gather, reduce-scatter, all-reduce)
  other       aten's own kernels: copies, sorts, index ops, reductions

`profile_gemms(fn, reps, device)` answers which matmuls those are: it
profiles with host ops and their input shapes recorded (slower on the host,
so it is a separate run), attributes each matmul op's kernel time to its
shapes, and gives the rate each shape reached (2·m·k·n FLOPs per call):
the GEMMs that run far below the card's peak are the ones to look at.

Under data parallelism the collectives run on their own streams beside the
compute: `compute_busy_ms` is the busy time without them, so `busy_ms -
compute_busy_ms` is the time only communication ran (exposed, not hidden
behind compute), and `wall_ms - busy_ms` the time the GPU did nothing.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

KINDS = ("gemm", "attention", "triton", "fused", "comm", "other")

_GEMM = re.compile(r"gemm|nvjet|xmma|cutlass|wgmma|cublas|sm90_|sm80_|_mm_|splitk", re.I)
_ATTN = re.compile(r"flash|fmha|flex_attention|attention|sdpa|cudnn", re.I)
_FUSED = re.compile(r"^triton_(poi|red|per)_")
_OURS = re.compile(r"^_\w+_kernel$")
_COMM = re.compile(r"nccl", re.I)


def kernel_kind(name: str) -> str:
    if _COMM.search(name):
        return "comm"
    if name.startswith("triton_tem_"):  # inductor templates: flex attention or a matmul
        return "attention" if _ATTN.search(name) else "gemm"
    if _FUSED.match(name):
        return "fused"
    if _ATTN.search(name):
        return "attention"
    if _GEMM.search(name):
        return "gemm"
    if _OURS.match(name):
        return "triton"
    return "other"


def idle_gaps(events: list[tuple[str, float, float]], reps: int, min_us: float = 5.0,
              top: int = 10) -> list[dict]:
    """Where the GPU waited: the gaps between its busy stretches (no kernel running)
    of at least `min_us`, grouped by the kernel that ended before the gap and the
    one that started after it, largest total first, per repetition:
    {before, after, gaps, ms}. The gaps a CUDA graph removes are launch gaps;
    the ones left under graphs are where the host ran eager code (a loss, the
    optimizer) or waited."""
    groups: dict[tuple[str, str], list[float]] = {}
    last_name, last_end = None, None
    for name, s, e in sorted(events, key=lambda ev: ev[1]):
        if last_end is not None and s - last_end >= min_us:
            groups.setdefault((last_name[:80], name[:80]), []).append(s - last_end)
        if last_end is None or e >= last_end:
            last_name, last_end = name, e
    rows = sorted(({"before": b, "after": a, "gaps": len(g) / reps, "ms": sum(g) / 1e3 / reps}
                   for (b, a), g in groups.items()), key=lambda r: -r["ms"])
    return rows[:top]


def busy_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals (overlaps counted once)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


@dataclass
class KernelProfile:
    """Per repetition of the profiled function, in ms."""
    wall_ms: float
    kernel_ms: float
    busy_ms: float
    kinds_ms: dict[str, float] = field(default_factory=dict)
    top: list[dict] = field(default_factory=list)   # {name, kind, calls, ms}, largest first
    kernels: int = 0                                  # kernel launches per repetition
    compute_busy_ms: float | None = None              # busy time of every kind but comm
    gaps: list[dict] = field(default_factory=list)    # idle_gaps(): where the GPU waited, largest first

    @property
    def comm_only_ms(self) -> float:
        """Time only collectives ran: communication not hidden behind compute."""
        return self.busy_ms - (self.busy_ms if self.compute_busy_ms is None else self.compute_busy_ms)

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(events: list[tuple[str, float, float]], reps: int, wall_ms: float, top: int = 10) -> KernelProfile:
    """events: (kernel name, start µs, end µs) of `reps` repetitions."""
    by_name: dict[str, list[float]] = {}
    kinds = dict.fromkeys(KINDS, 0.0)
    for name, s, e in events:
        by_name.setdefault(name, []).append(e - s)
        kinds[kernel_kind(name)] += (e - s) / 1e3 / reps
    rows = sorted(({"name": n[:120], "kind": kernel_kind(n), "calls": len(d) / reps, "ms": sum(d) / 1e3 / reps}
                   for n, d in by_name.items()), key=lambda r: -r["ms"])
    return KernelProfile(
        wall_ms=wall_ms / reps,
        kernel_ms=sum(e - s for _, s, e in events) / 1e3 / reps,
        busy_ms=busy_union([(s, e) for _, s, e in events]) / 1e3 / reps,
        kinds_ms={k: v for k, v in kinds.items() if v > 0},
        top=rows[:top],
        kernels=round(len(events) / reps),
        compute_busy_ms=busy_union([(s, e) for n, s, e in events if kernel_kind(n) != "comm"]) / 1e3 / reps,
        gaps=idle_gaps(events, reps))


def device_events(prof) -> list[tuple[str, float, float]]:
    """(name, start µs, end µs) of every kernel / device-side event the profiler saw."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            out.append((e.name, float(e.time_range.start), float(e.time_range.end)))
    return out


def profile_kernels(fn, reps: int, device, top: int = 10) -> KernelProfile | None:
    """Run fn() `reps` times under torch.profiler; None where there is no CUDA device."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    # CUDA activity only: recording every host-side op would slow the host
    # and make the GPU look idler than it is
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) * 1e3
    return summarize(device_events(prof), reps, wall, top)


def profile_text(title: str, p: KernelProfile, scale: float = 1.0) -> list[str]:
    """A few lines for one profile; `scale` multiplies every time (a family's layer count)."""
    kinds = ", ".join(f"{k} {v * scale:.1f}" for k, v in sorted(p.kinds_ms.items(), key=lambda kv: -kv[1]))
    lines = [f"  {title}: wall {p.wall_ms * scale:.1f} ms, GPU busy {p.busy_ms * scale:.1f} ms "
             f"({p.busy_ms / p.wall_ms * 100:.0f}%), {p.kernels} kernels; by kind: {kinds}"]
    if p.kinds_ms.get("comm"):
        lines.append(f"  communication only (not hidden behind compute): {p.comm_only_ms * scale:.1f} ms; "
                     f"GPU idle: {(p.wall_ms - p.busy_ms) * scale:.1f} ms")
    for r in p.top:
        lines.append(f"      {r['ms'] * scale:7.2f} ms  {r['calls']:5.1f}x  {r['kind']:9} {r['name'][:90]}")
    if p.gaps:
        lines.append(f"  GPU idle between kernels (gaps of 5 us or more), largest first:")
        for g in p.gaps[:8]:
            lines.append(f"      {g['ms'] * scale:7.2f} ms  {g['gaps']:5.1f}x  after {g['before'][:45]}  "
                         f"before {g['after'][:45]}")
    return lines


# aten's matmul ops that launch their own kernels (not matmul/linear, which
# call these: counting both would count a kernel twice)
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm",
            "aten::_scaled_mm", "aten::_scaled_grouped_mm")


def gemm_flops(op: str, shapes: list) -> float | None:
    """FLOPs of one call of matmul op `op` with input shapes `shapes` (None if unknown).
    _grouped_mm: (m, k) x (g, k, n) -> 2 m k n; (k, m) x (m, n) -> (g, k, n), the
    weight gradient, 2 k m n (m the rows split over the groups)."""
    dims = [list(d) for d in shapes if isinstance(d, (list, tuple))]
    try:
        if op in ("aten::mm", "aten::_scaled_mm"):
            (m, k), (_, n) = dims[0], dims[1]
        elif op == "aten::addmm":
            (m, k), (_, n) = dims[1], dims[2]
        elif op == "aten::bmm":
            (b, m, k), (_, _, n) = dims[0], dims[1]
            return 2.0 * b * m * k * n
        elif op == "aten::baddbmm":
            (b, m, k), (_, _, n) = dims[1], dims[2]
            return 2.0 * b * m * k * n
        elif op in ("aten::_grouped_mm", "aten::_scaled_grouped_mm"):
            a, w = dims[0], dims[1]
            if len(a) == 2 and len(w) == 3:
                m, k, n = a[0], a[1], w[2]
            elif len(a) == 2 and len(w) == 2:
                m, k, n = a[0], a[1], w[1]
            else:
                return None
        else:
            return None
    except (IndexError, ValueError, TypeError):
        return None
    return 2.0 * m * k * n


def gemm_rows(ops: list[tuple[str, list, float]], reps: int, top: int = 15) -> list[dict]:
    """ops: (op name, input shapes, device µs of its kernels) per call, over `reps`
    repetitions; rows per (op, shapes), largest time first, with the TFLOP/s reached."""
    by_key: dict[tuple, list[float]] = {}
    for name, shapes, us in ops:
        if name in GEMM_OPS and us > 0:
            key = (name, tuple(tuple(d) for d in shapes if isinstance(d, (list, tuple)) and d))
            by_key.setdefault(key, []).append(us)
    rows = []
    for (name, shp), us in by_key.items():
        ms = sum(us) / 1e3 / reps
        fl = gemm_flops(name, [list(d) for d in shp])
        calls = len(us) / reps
        rows.append({"op": name.removeprefix("aten::"), "shapes": " x ".join(str(list(d)) for d in shp),
                     "calls": calls, "ms": ms,
                     "tflops": (fl * calls / (ms / 1e3) / 1e12) if fl and ms else None})
    rows.sort(key=lambda r: -r["ms"])
    return rows[:top]


def profile_gemms(fn, reps: int, device, top: int = 15) -> list[dict] | None:
    """Run fn() `reps` times under torch.profiler with host ops and shapes recorded;
    the matmuls by shape (gemm_rows). None where there is no CUDA device."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
    ops = [(e.name, e.input_shapes or [], float(getattr(e, "device_time_total", 0.0) or 0.0))
           for e in prof.events() if e.name in GEMM_OPS]
    return gemm_rows(ops, reps, top)


def gemm_text(rows: list[dict], peak_tflops: float | None = None) -> list[str]:
    """Lines for profile_gemms' rows (the rate as a share of `peak_tflops` where given)."""
    lines = ["  matmuls by shape (profiled step): ms, calls, TFLOP/s" + (" (of peak)" if peak_tflops else "")]
    for r in rows:
        rate = "" if r["tflops"] is None else f"{r['tflops']:6.0f}" + (
            f" ({r['tflops'] / peak_tflops * 100:.0f}%)" if peak_tflops else "")
        lines.append(f"      {r['ms']:7.2f} ms  {r['calls']:5.1f}x  {rate:>13s}  {r['op']:12s} {r['shapes'][:80]}")
    return lines
