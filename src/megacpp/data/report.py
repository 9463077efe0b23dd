"""Plain-text tables and JSON records for the `megacpp data` commands."""
from __future__ import annotations

from pathlib import Path

from megacpp.data.schema import SPLITS


def table(rows: list[list], header: list[str]) -> str:
    """Left-aligned text columns, numbers right-aligned."""
    cells = [[str(c) for c in header]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    numeric = [all(isinstance(r[i], (int, float)) for r in rows) and rows for i in range(len(header))]
    lines = []
    for n, r in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] and n else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def sources_listing(specs: list[str] | None, cache_dir: Path | None) -> dict:
    """What `data sources` reports: resolved sources with pins, apt candidates, cached debs."""
    from megacpp.data.sources import SUGGESTED_DEBIAN, apt_candidate, cached_debs, resolve_source

    resolved = [resolve_source(s, cache_dir) for s in (specs or ["system"])]
    out = {
        "sources": [
            {
                "spec": s.spec,
                "kind": s.kind,
                "files": len(s.files),
                "bytes": sum(f.size for f in s.files),
                "skipped": s.skipped,
                "inputs": [i.to_json() for i in s.inputs],
            }
            for s in resolved
        ],
        "cached_debian": cached_debs(cache_dir),
    }
    if not specs:
        out["debian_available"] = [{"spec": f"debian:{p}", "candidate": apt_candidate(p)} for p in SUGGESTED_DEBIAN]
    return out


def format_sources(listing: dict) -> str:
    blocks = []
    for src in listing["sources"]:
        rows = [
            [i["name"], i["version"], i["files"], round(i["bytes"] / 2**20, 2), ",".join(i["license"]["ids"])[:40], i["sha256"][:12]]
            for i in sorted(src["inputs"], key=lambda i: -i["bytes"])
        ]
        head = f"{src['spec']}: {len(src['inputs'])} inputs, {src['files']} files, {src['bytes'] / 2**20:.1f} MiB"
        if src["skipped"]:
            head += " (skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(src["skipped"].items())) + ")"
        blocks.append(head + "\n" + table(rows, ["input", "version", "files", "MiB", "license", "sha256"]))
    if listing.get("debian_available"):
        rows = [[d["spec"], d["candidate"] or "not in apt lists (run apt-get update)"] for d in listing["debian_available"]]
        blocks.append("debian packages (fetched on use with apt-get download):\n" + table(rows, ["source", "candidate"]))
    if listing["cached_debian"]:
        rows = [[d["name"], d["version"], d["file"]] for d in listing["cached_debian"]]
        blocks.append("already downloaded:\n" + table(rows, ["package", "version", "file"]))
    return "\n\n".join(blocks)


def snapshot_summary(snap) -> dict:
    m = snap.manifest
    return {
        "path": str(snap.path),
        "snapshot_id": snap.snapshot_id,
        "schema_version": snap.schema_version,
        "seq_len": snap.seq_len,
        "vocab_size": snap.vocab_size,
        "tokenizer_sha256": snap.tokenizer_sha256,
        "bytes_per_token_val": m["tokenizer"]["bytes_per_token_val"],
        "inputs": len(m["inputs"]),
        "splits": {
            s: {k: v for k, v in m["splits"][s].items() if k not in ("per_input", "shards")} for s in SPLITS
        },
        "drops": {k: v["files"] for k, v in sorted(m["corpus"]["drops"].items())},
        "near_duplicates": m["corpus"]["dedup"]["near"],
    }


def format_summary(summary: dict) -> str:
    rows = [
        [s, i["documents"], round(i["bytes"] / 2**20, 2), i["tokens"], i["rows"], i["bytes_per_token"]]
        for s, i in summary["splits"].items()
    ]
    drops = ", ".join(f"{k} {v}" for k, v in summary["drops"].items()) or "none"
    near = summary["near_duplicates"]
    return "\n".join(
        [
            f"snapshot {summary['snapshot_id'][:16]}  {summary['path']}",
            f"schema v{summary['schema_version']}, seq_len {summary['seq_len']}, vocab {summary['vocab_size']}, "
            f"{summary['inputs']} inputs, val bytes/token {summary['bytes_per_token_val']}",
            table(rows, ["split", "docs", "MiB", "tokens", "rows", "bytes/token"]),
            f"dropped files: {drops}",
            f"near-dup (jaccard >= {near['threshold']}): {near['groups_with_duplicates']} groups, "
            f"{near['duplicates_dropped']} dropped",
        ]
    )
