"""torch.compile per block (or whole model), with compile statistics recorded."""
from __future__ import annotations

import torch


def apply_compile(model: torch.nn.Module, spec) -> dict:
    if spec.mode == "none":
        return {"mode": "none", "targets": 0}
    kwargs = {"fullgraph": spec.fullgraph}
    if spec.mode != "default":
        kwargs["mode"] = spec.mode
    if spec.scope == "model":
        model.compile(**kwargs)
        return {"mode": spec.mode, "scope": "model", "targets": 1}
    # Layers share Block.forward's code object, so each family (and variant)
    # is a recompile of one frame; dynamo's default limit of 8 would leave
    # the later layers of a 24-layer hybrid running eagerly.
    import torch._dynamo.config as dcfg
    dcfg.recompile_limit = max(dcfg.recompile_limit, 2 * len(model.layers) + 8)
    if hasattr(dcfg, "accumulated_recompile_limit"):
        dcfg.accumulated_recompile_limit = max(dcfg.accumulated_recompile_limit, 64 * len(model.layers))
    for layer in model.layers:
        layer.compile(**kwargs)
    return {"mode": spec.mode, "scope": "block", "targets": len(model.layers)}


def compile_stats() -> dict:
    """Graphs compiled and recompiles so far in this process (dynamo counters)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:
        return {}
    stats = counters.get("stats", {})
    return {"unique_graphs": int(stats.get("unique_graphs", 0)),
            "calls_captured": int(stats.get("calls_captured", 0)),
            "recompiles": int(sum(counters.get("recompiles", {}).values()))
            if "recompiles" in counters else 0,
            "graph_breaks": int(sum(counters.get("graph_break", {}).values()))}
