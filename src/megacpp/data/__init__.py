"""Data pipeline: C++ sources -> deduplicated corpus -> tokenizer -> packed parquet rows -> loader.

Public entry points (imported lazily so that `megacpp data sources` does not pay for torch):

    prepare_snapshot(out, sources=("system",), config=PrepareConfig())   -> Snapshot
    open_snapshot(dir, verify=True)                                      -> Snapshot
    load_tokenizer(snapshot)                                             -> tokenizers.Tokenizer
    PackedLoader(snapshot_dir, split, batch_size, seed=0, rank=0, world_size=1, epochs=None)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "PackedLoader": "megacpp.data.loader",
    "Snapshot": "megacpp.data.loader",
    "open_snapshot": "megacpp.data.loader",
    "load_tokenizer": "megacpp.data.tokenizer",
    "PrepareConfig": "megacpp.data.prepare",
    "prepare_snapshot": "megacpp.data.prepare",
    "SCHEMA_VERSION": "megacpp.data.schema",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'megacpp.data' has no attribute {name!r}")
