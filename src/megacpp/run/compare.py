"""`megacpp compare RUN_A RUN_B`: what differs between two runs, then their metrics.

Differences are reported per manifest section (spec, pattern, patches,
auxiliary losses, backend) as dotted paths with both values, so a changed
patch, a moved aux-loss start step or a changed pattern is named directly.
"""
from __future__ import annotations

from pathlib import Path

from ..train.gpu_clocks import mfu_at_clock
from ..train.metrics import read_metrics
from .manifest import read_manifest

SECTIONS = ("spec", "pattern", "patches", "aux_losses", "backend")
# Facts that differ between any two runs and say nothing about what was run.
NOISE = {"backend.git.dirty", "backend.cpu_threads"}


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) and "name" in x for x in obj):
        for x in obj:  # lists of named records (patches) compare by name
            _flatten(f"{prefix}.{x['name']}", {k: v for k, v in x.items() if k != "name"}, out)
    elif isinstance(obj, list) and obj and all(isinstance(x, dict) and "index" in x for x in obj):
        for x in obj:  # per-layer rows compare by index
            _flatten(f"{prefix}.{x['index']}", {k: v for k, v in x.items() if k != "index"}, out)
    else:
        out[prefix] = obj


def _patch_view(m: dict) -> dict:
    """Patch records without per-run parity numbers (fresh random inputs each run)."""
    out = []
    for p in m.get("patches", []):
        q = {k: v for k, v in p.items() if k != "parity"}
        q["parity_passed"] = all(r.get("passed") for r in p.get("parity", [])) if p.get("parity") else None
        out.append(q)
    return out


def diff_manifests(a: dict, b: dict) -> dict[str, list[tuple[str, object, object]]]:
    out: dict[str, list] = {}
    for section in SECTIONS:
        fa, fb = {}, {}
        va = _patch_view(a) if section == "patches" else a.get(section, {})
        vb = _patch_view(b) if section == "patches" else b.get(section, {})
        _flatten(section, va, fa)
        _flatten(section, vb, fb)
        rows = []
        for key in sorted(set(fa) | set(fb)):
            if key in NOISE:
                continue
            x, y = fa.get(key, "<absent>"), fb.get(key, "<absent>")
            if x != y:
                rows.append((key, x, y))
        out[section] = rows
    return out


def _last(records: list[dict], kind: str, key: str):
    vals = [r[key] for r in records if r.get("kind") == kind and r.get(key) is not None]
    return vals[-1] if vals else None


def _median(records: list[dict], key: str):
    vals = sorted(r[key] for r in records if r.get("kind") == "train" and r.get(key) is not None)
    return vals[len(vals) // 2] if vals else None


def _clocks(m: dict) -> dict | None:
    """The run's card clocks over its counted steps (outcome.clocks), where sampled.
    A record without a `window` was sampled over the whole run, compile and
    evaluations included, when the card idles at its boost clock (the first
    GPU manifests, sixteenth session): not the steps' clock, so not shown."""
    c = m.get("outcome", {}).get("clocks")
    return c if c and c.get("available") and c.get("window") else None


def metrics_side_by_side(run_a: Path, run_b: Path, ma: dict, mb: dict) -> list[tuple[str, object, object]]:
    ra, rb = read_metrics(run_a), read_metrics(run_b)
    rows = []
    for label, fn in (
        ("steps", lambda r, m: m["outcome"].get("steps")),
        ("tokens", lambda r, m: m["outcome"].get("tokens")),
        ("final train loss", lambda r, m: m["outcome"].get("final_train_loss")),
        ("final val loss", lambda r, m: m["outcome"].get("final_val_loss")),
        ("final val bpb", lambda r, m: m["outcome"].get("final_val_bpb")),
        ("first val bpb", lambda r, m: m["outcome"].get("first_val_bpb")),
        ("median tokens/s", lambda r, m: _median(r, "tokens_per_s")),
        ("median MFU", lambda r, m: _median(r, "mfu")),
        ("median SM clock MHz", lambda r, m: (_clocks(m) or {}).get("sm_mhz_median")),
        ("median MFU at that clock", lambda r, m: mfu_at_clock(_median(r, "mfu"), _clocks(m))),
        ("peak memory GiB", lambda r, m: (m["outcome"].get("peak_memory_bytes") or 0) / 2**30),
        ("last stp", lambda r, m: _last(r, "train", "stp")),
        ("last moe_balance", lambda r, m: _last(r, "train", "moe_balance")),
        ("last mtp", lambda r, m: _last(r, "train", "mtp")),
        ("wall seconds", lambda r, m: m["outcome"].get("wall_seconds")),
        ("end reason", lambda r, m: m["outcome"].get("end_reason")),
    ):
        rows.append((label, fn(ra, ma), fn(rb, mb)))
    return rows


def compare(run_a, run_b) -> dict:
    run_a, run_b = Path(run_a), Path(run_b)
    ma, mb = read_manifest(run_a), read_manifest(run_b)
    return {"a": str(run_a), "b": str(run_b), "differences": diff_manifests(ma, mb),
            "metrics": metrics_side_by_side(run_a, run_b, ma, mb)}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    s = str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def compare_text(result: dict) -> str:
    lines = [f"A: {result['a']}", f"B: {result['b']}", ""]
    titles = {"spec": "spec (recipe)", "pattern": "hybrid pattern", "patches": "memory patches",
              "aux_losses": "auxiliary losses", "backend": "backend contract"}
    for section, rows in result["differences"].items():
        lines.append(f"== {titles[section]}: " + ("same" if not rows else f"{len(rows)} difference(s)"))
        for key, x, y in rows[:40]:
            lines.append(f"   {key}: {_fmt(x)}  ->  {_fmt(y)}")
        if len(rows) > 40:
            lines.append(f"   ... {len(rows) - 40} more (--json shows all)")
    lines.append("")
    lines.append(f"{'metric':20} {'A':>16} {'B':>16}")
    for label, x, y in result["metrics"]:
        lines.append(f"{label:20} {_fmt(x):>16} {_fmt(y):>16}")
    return "\n".join(lines)
