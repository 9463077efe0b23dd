"""`megacpp data prepare`: sources -> corpus -> tokenizer -> packed shards -> snapshot.

The snapshot is built in a scratch directory beside `out` and renamed into
place only after it passes `open_snapshot` (schema, files, hashes) and one
batch has gone through the real `PackedLoader`. The manifest holds no times
or scratch paths, so the same inputs and settings give the same bytes and
the same snapshot id.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers

from megacpp.data.corpus import TEXT_POLICY, CorpusConfig, build_corpus
from megacpp.data.dedup import MinHashConfig
from megacpp.data.loader import PackedLoader, Snapshot, manifest_digest, open_snapshot
from megacpp.data.pack import pack_documents, write_shards
from megacpp.data.schema import (
    DOCUMENT_SCHEMA,
    DOCUMENTS_NAME,
    FORMAT,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    SPLITS,
    TOKENIZER_NAME,
)
from megacpp.data.sources import resolve_source
from megacpp.data.tokenizer import encode_documents, save_tokenizer, special_ids, train_tokenizer
from megacpp.errors import DataError

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SEQ_LEN = 256
# 64 MiB of kept text keeps the default `system` build well under 2 minutes on 2 cores.
DEFAULT_MAX_BYTES = 64 << 20


@dataclass(frozen=True)
class PrepareConfig:
    """Every knob of a snapshot build; all of it is written to the manifest."""

    vocab_size: int = DEFAULT_VOCAB_SIZE
    seq_len: int = DEFAULT_SEQ_LEN
    max_bytes: int = DEFAULT_MAX_BYTES  # cap on kept text; 0 = no cap
    max_file_bytes: int = 1_000_000
    max_line_chars: int = 1000
    near_dup_threshold: float = 0.8
    near_dup_keep: int = 1  # 0 keeps every member of a near-duplicate group
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    rows_per_shard: int = 16384

    def validate(self) -> None:
        checks = [
            ("vocab_size", self.vocab_size > 259, "must be > 259 (256 bytes + 3 special tokens)"),
            ("vocab_size", self.vocab_size <= 2**31 - 1, "must fit int32"),
            ("seq_len", self.seq_len >= 2, "must be >= 2"),
            ("max_bytes", self.max_bytes >= 0, "must be >= 0"),
            ("max_file_bytes", self.max_file_bytes > 0, "must be > 0"),
            ("near_dup_threshold", 0.0 < self.near_dup_threshold <= 1.0, "must be in (0, 1]"),
            ("near_dup_keep", self.near_dup_keep >= 0, "must be >= 0"),
            ("split", len(self.split) == 3 and min(self.split) >= 0 and abs(sum(self.split) - 1) < 1e-9 and self.split[0] > 0,
             "must be three fractions train,val,test summing to 1 with train > 0"),
            ("rows_per_shard", self.rows_per_shard >= 1, "must be >= 1"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise DataError(f"prepare: {name}={getattr(self, name)!r} {why}")


def sizes_from_recipe(
    recipe: str | None, vocab_size: int | None, seq_len: int | None, sets: list[str] | None = None
) -> tuple[int, int, dict]:
    """vocab_size and seq_len: explicit value, else the recipe's, else the default.

    The recipe (`megacpp.load_recipe(recipe, sets)`) is loaded only when named.
    Returns (vocab_size, seq_len, a record of where each came from).
    """
    record: dict = {}
    spec = policy = None
    if recipe:
        import megacpp  # lazy: recipes are needed only when one is named

        r = megacpp.load_recipe(recipe, list(sets or []))
        spec, policy = r.model, r.policy
        record["recipe"] = {"name": str(recipe), "sets": list(sets or []), "hash": r.hash}
    if vocab_size is None:
        vocab_size = int(spec.vocab_size) if spec is not None else DEFAULT_VOCAB_SIZE
        record["vocab_size_from"] = "recipe" if spec is not None else "default"
    else:
        record["vocab_size_from"] = "flag"
    if seq_len is None:
        seq_len = int(policy.seq_len) if policy is not None else DEFAULT_SEQ_LEN
        record["seq_len_from"] = "recipe" if policy is not None else "default"
    else:
        record["seq_len_from"] = "flag"
    return vocab_size, seq_len, record


def prepare_snapshot(
    out: str | Path,
    sources: Sequence[str] = ("system",),
    config: PrepareConfig = PrepareConfig(),
    *,
    provenance: dict | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Snapshot:
    """Build a snapshot from `sources` into `out` and return it opened.

    provenance: extra facts for the manifest (e.g. the recipe, from
    `sizes_from_recipe`). force: replace an existing snapshot at `out`.
    """
    config.validate()
    out = Path(out)
    if not sources:
        raise DataError("--sources: no sources given")
    if len(set(sources)) != len(sources):
        raise DataError(f"--sources: a source is named twice ({', '.join(sources)})")
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"{out}: exists and is not empty (pass --force to replace it)")
    say = log or (lambda msg: None)
    clock = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _build(tmp, list(sources), config, provenance or {}, cache_dir, say)
        say("checking: open_snapshot + one batch through PackedLoader")
        _smoke(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    snap = open_snapshot(out, verify=False)
    say(f"done in {time.perf_counter() - clock:.1f} s: {out} (snapshot {snap.snapshot_id[:16]})")
    return snap


def _build(tmp: Path, specs: list[str], config: PrepareConfig, provenance: dict, cache_dir, say) -> None:
    t0 = time.perf_counter()
    resolved = [resolve_source(spec, cache_dir) for spec in specs]
    inputs, offsets = [], []
    for src in resolved:
        offsets.append(len(inputs))
        inputs.extend(src.inputs)
    if len(inputs) > np.iinfo(np.int16).max:
        raise DataError(f"--sources: {len(inputs)} inputs exceed the int16 source_ids column")
    say(f"sources: {len(inputs)} pinned inputs, {sum(len(s.files) for s in resolved)} files ({time.perf_counter() - t0:.1f} s)")

    corpus_cfg = CorpusConfig(
        max_bytes=config.max_bytes,
        max_file_bytes=config.max_file_bytes,
        max_line_chars=config.max_line_chars,
        near_dup=MinHashConfig(threshold=config.near_dup_threshold),
        near_dup_keep=config.near_dup_keep,
        split=tuple(config.split),
    )
    corpus = build_corpus(resolved, offsets, corpus_cfg, log=say)
    # Within a split, documents go by content hash: stable and mixes sources in every row.
    by_split = {s: sorted((d for d in corpus.documents if d.split == s), key=lambda d: d.sha256) for s in SPLITS}
    if not by_split["train"]:
        raise DataError(f"{', '.join(specs)}: no document fell in the train split ({len(corpus.documents)} documents)")
    say(
        "corpus: "
        + ", ".join(f"{s} {len(by_split[s])} docs" for s in SPLITS)
        + f"; dropped {sum(d['files'] for d in corpus.drops.values())} files ({time.perf_counter() - t0:.1f} s)"
    )

    tok = train_tokenizer((d.text for d in by_split["train"]), config.vocab_size)
    tok_sha = save_tokenizer(tok, tmp / TOKENIZER_NAME)
    ids = special_ids(tok)
    say(f"tokenizer: {tok.get_vocab_size()} entries trained on train ({time.perf_counter() - t0:.1f} s)")

    files: dict[str, dict] = {TOKENIZER_NAME: {"bytes": (tmp / TOKENIZER_NAME).stat().st_size, "sha256": tok_sha}}
    splits: dict[str, dict] = {}
    doc_rows: dict[str, list] = {name: [] for name in DOCUMENT_SCHEMA.names}
    next_index = 0
    for split in SPLITS:
        docs = by_split[split]
        encoded = list(encode_documents(tok, [d.text for d in docs]))
        indices = list(range(next_index, next_index + len(docs)))
        next_index += len(docs)
        packed = pack_documents(encoded, indices, [d.input_id for d in docs], config.seq_len, ids["bos"], ids["eos"], ids["pad"])
        shards = write_shards(packed, tmp, split, config.seq_len, config.rows_per_shard)
        for rec in shards:
            files[rec["file"]] = {"bytes": rec["bytes"], "sha256": rec["sha256"]}
        text_bytes = sum(d.nbytes for d in docs)
        text_tokens = int(sum(a.size for a in encoded))
        splits[split] = {
            "documents": len(docs),
            "bytes": text_bytes,
            "tokens": packed.doc_tokens,
            "text_tokens": text_tokens,
            "padding_tokens": packed.pad_tokens,
            "rows": packed.rows,
            "bytes_per_token": round(text_bytes / text_tokens, 4) if text_tokens else None,
            "per_input": _per_input(docs, encoded),
            "shards": [{"file": r["file"], "rows": r["rows"]} for r in shards],
        }
        for d, a, idx, start in zip(docs, encoded, indices, packed.starts):
            for key, value in (
                ("doc_index", idx), ("split", split), ("input_id", d.input_id), ("path", d.path),
                ("sha256", d.sha256), ("bytes", d.nbytes), ("tokens", a.size + 2), ("group", d.group),
                ("start", int(start)),
            ):
                doc_rows[key].append(value)
    say(f"packed: {sum(s['rows'] for s in splits.values())} rows of {config.seq_len + 1} tokens ({time.perf_counter() - t0:.1f} s)")

    pq.write_table(pa.Table.from_pydict(doc_rows, schema=DOCUMENT_SCHEMA), tmp / DOCUMENTS_NAME, compression="zstd")
    data = (tmp / DOCUMENTS_NAME).read_bytes()
    files[DOCUMENTS_NAME] = {"bytes": len(data), "sha256": _sha(data)}

    manifest = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "seq_len": config.seq_len,
        "row_length": config.seq_len + 1,
        "sources": [
            {"spec": s.spec, "kind": s.kind, "inputs": list(range(off, off + len(s.inputs))), "candidate_files": len(s.files)}
            for s, off in zip(resolved, offsets)
        ],
        "inputs": [dict(id=i, **inp.to_json()) for i, inp in enumerate(inputs)],
        "config": {**asdict(config), "split": list(config.split)},
        "provenance": provenance,
        "text_policy": TEXT_POLICY,
        "corpus": {
            "documents": len(corpus.documents),
            "drops": corpus.drops,
            "fixes": corpus.notes,
            "dedup": corpus.dedup,
            "split_key": "sha256 of the near-duplicate group's first document; fractions from config.split",
            "document_order": "sha256 of the document within each split",
        },
        "tokenizer": {
            "file": TOKENIZER_NAME,
            "sha256": tok_sha,
            "kind": "byte-level BPE (HF tokenizers)",
            "vocab_size": tok.get_vocab_size(),
            "requested_vocab_size": config.vocab_size,
            "special_ids": ids,
            "trained_on": "train",
            "bytes_per_token_val": splits["val"]["bytes_per_token"],
        },
        "splits": splits,
        "documents_file": DOCUMENTS_NAME,
        "files": dict(sorted(files.items())),
        "tools": {"tokenizers": tokenizers.__version__, "pyarrow": pa.__version__},
    }
    manifest["snapshot_id"] = manifest_digest(manifest)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def _per_input(docs, encoded) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for d, a in zip(docs, encoded):
        rec = out.setdefault(str(d.input_id), {"documents": 0, "bytes": 0, "tokens": 0})
        rec["documents"] += 1
        rec["bytes"] += d.nbytes
        rec["tokens"] += int(a.size) + 2
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _smoke(path: Path) -> None:
    """The consumer check: full validation, then one batch through the real loader."""
    snap = open_snapshot(path, verify=True)
    loader = PackedLoader(snap, "train", batch_size=min(4, snap.split_rows["train"]), epochs=1, verify=False)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    t = snap.seq_len
    for key in ("input_ids", "labels", "doc_ids", "positions"):
        if batch[key].ndim != 2 or batch[key].shape[1] != t:
            raise DataError(f"{path}: smoke batch '{key}' has shape {tuple(batch[key].shape)}, expected (B, {t})")
    ids = batch["input_ids"]
    if int(ids.min()) < 0 or int(ids.max()) >= snap.vocab_size:
        raise DataError(f"{path}: smoke batch has token ids outside [0, {snap.vocab_size})")
