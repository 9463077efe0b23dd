"""torch.compile per block (or whole model), with compile statistics recorded."""
from __future__ import annotations

import re

import torch


def resolve_mode(mode: str, device: torch.device | None, sharding: str = "none") -> str:
    """policy.compile.mode as it runs: "auto" is CUDA graphs ("reduce-overhead")
    on one CUDA device, where launch gaps cost most and nothing gathers weights
    between steps, and "default" under DDP/FSDP2 or off CUDA (inductor makes no
    CUDA graphs there). Every other mode is itself."""
    if mode != "auto":
        return mode
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "reduce-overhead" if on_cuda and sharding == "none" else "default"


def resolve_scope(scope: str, device: torch.device | None, sharding: str = "none") -> str:
    """policy.compile.scope as it runs: "auto" is one graph for the whole model
    ("model") on one CUDA device and a graph per layer ("block") under DDP/FSDP2
    (their hooks run between layers; a whole-model graph there is not measured
    here) or off CUDA. "block" and "model" are themselves."""
    if scope != "auto":
        return scope
    on_cuda = device is not None and torch.device(device).type == "cuda"
    return "model" if on_cuda and sharding == "none" else "block"


# compile modes whose calls replay CUDA graphs (inductor's cudagraph trees)
GRAPH_MODES = ("reduce-overhead", "max-autotune")


def graph_step_begin(info: dict) -> None:
    """Before each forward of a run compiled with CUDA graphs (info: apply_compile's
    record): tells the cudagraph trees that a new iteration starts, so the graph
    outputs of the last one may be overwritten, as torch's error message asks of
    training loops. Every caller has run the last iteration's backward and copied
    what it keeps. On its own it did not cure the failure seen at nam-125m's second
    micro-batch (H200, 2026-11-28): that was the gradients, see
    keep_grads_outside_graphs; the runs that trained equal to the default mode
    had both."""
    if info.get("mode") in GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()


def keep_grads_outside_graphs(model: torch.nn.Module, info: dict) -> bool:
    """Under CUDA graphs, gives every trainable parameter a zero .grad of its own
    and returns True: the caller then zeroes grads in place (set_to_none=False)
    instead of dropping them. Otherwise autograd makes a None .grad *be* the
    backward graph's output buffer, the next micro-batch's replay overwrites it
    and the accumulation reads the overwritten buffer (torch 2.11 on an H200,
    2026-11-28: "accessing tensor output of CUDAGraphs that has been overwritten"
    at nam-125m's second micro-batch, its stack the weight's forward use, with
    the step marker or without). The price: the gradients stay allocated through
    the forward (float32 parameters: 4 bytes each, 0.9 GB at nam-125m's 230M),
    where set_to_none freed them between steps. Returns False (nothing done) in
    other modes."""
    if info.get("mode") not in GRAPH_MODES:
        return False
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    return True


def _enable_pdl(device: torch.device | None):
    """Turns on inductor's Programmatic Dependent Launch (process-wide, as
    tune_kernels) where it can run; returns True, or why not as a string (the
    compile record keeps it, so a run that asked for PDL and ran without says so)."""
    import torch._inductor.config as icfg
    if not hasattr(icfg.triton, "enable_pdl"):
        return f"not applied: torch {torch.__version__}'s inductor has no triton.enable_pdl"
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda":
        return "not applied: PDL is a CUDA launch attribute (device is not CUDA)"
    major, minor = torch.cuda.get_device_capability(dev)
    if major < 9:
        return f"not applied: PDL needs sm90 or later (this GPU is sm{major}{minor})"
    icfg.triton.enable_pdl = True
    return True


def apply_compile(model: torch.nn.Module, spec, device: torch.device | None = None, sharding: str = "none") -> dict:
    """Compile per spec (a CompileSpec); returns what ran: the resolved mode (and
    the requested one where "auto" chose), the scope and how many targets."""
    mode = resolve_mode(spec.mode, device, sharding)
    asked = {"requested": spec.mode} if spec.mode != mode else {}
    scope = resolve_scope(spec.scope, device, sharding)
    if scope != spec.scope:
        asked["requested_scope"] = spec.scope
    if mode == "none":
        return {"mode": "none", "targets": 0}
    # inductor's switches are process-wide, as its config is: every later
    # compile of this process takes them too (a run compiles one model)
    import torch._inductor.config as icfg
    if spec.tune_kernels:
        icfg.coordinate_descent_tuning = True
        asked["tune_kernels"] = True
    if spec.pdl:
        asked["pdl"] = _enable_pdl(device)
    if spec.combo_kernels:
        icfg.combo_kernels = True
        asked["combo_kernels"] = True
    kwargs = {"fullgraph": spec.fullgraph}
    if mode != "default":
        kwargs["mode"] = mode
    if scope == "model":
        # a HybridLM compiles all of its forward but FlexAttention's block mask
        # (see HybridLM.compile_body); any other module as a whole
        if hasattr(model, "compile_body"):
            model.compile_body(**kwargs)
        else:
            model.compile(**kwargs)
        return {"mode": mode, **asked, "scope": "model", "targets": 1}
    # Layers share Block.forward's code object, so each family (and variant)
    # is a recompile of one frame; dynamo's default limit of 8 would leave
    # the later layers of a 24-layer hybrid running eagerly.
    import torch._dynamo.config as dcfg
    dcfg.recompile_limit = max(dcfg.recompile_limit, 2 * len(model.layers) + 8)
    if hasattr(dcfg, "accumulated_recompile_limit"):
        dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 64 * len(model.layers))
    for layer in model.layers:
        layer.compile(**kwargs)
    return {"mode": mode, **asked, "scope": "block", "targets": len(model.layers)}


def _recompile_reason(text: str) -> str:
    """The first failed guard of a recompile, without its cache-entry id and
    source location: "GLOBAL_STATE changed: grad_mode", "tensor 'x' size
    mismatch at index 0. expected 3, actual 4", "self.family == 'moe'"."""
    first = text.strip().splitlines()[0] if text.strip() else "?"
    first = re.sub(r"^\d+/\d+:\s*", "", first)
    first = re.sub(r"\.? expected .*$", "", first.split("#")[0].strip())  # group sizes
    return first or "?"


def compile_stats() -> dict:
    """Graphs compiled and recompiles so far in this process, with why.

    Recompiles come from dynamo's per-compile metrics (compile id F/C with
    C > 0 is the C-th recompile of frame F); dynamo's `counters` has no
    recompile entry in torch 2.11+. Dynamo keeps the most recent metrics
    only (a bounded deque), so a long-running process may undercount.
    """
    try:
        from torch._dynamo.utils import counters, get_compilation_metrics
    except Exception:
        return {}
    stats = counters.get("stats", {})
    reasons: dict[str, int] = {}
    recompiles = 0
    for m in get_compilation_metrics():
        cid = str(getattr(m, "compile_id", "") or "")
        frame_compile = cid.split("/")[1].split("_")[0] if "/" in cid else "0"
        if frame_compile.isdigit() and int(frame_compile) > 0:
            recompiles += 1
            why = _recompile_reason(str(getattr(m, "recompile_reason", "") or ""))
            reasons[why] = reasons.get(why, 0) + 1
    top = dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:8])
    return {"unique_graphs": int(stats.get("unique_graphs", 0)),
            "calls_captured": int(stats.get("calls_captured", 0)),
            "recompiles": recompiles, "recompile_reasons": top,
            "graph_breaks": int(sum(counters.get("graph_break", {}).values()))}
