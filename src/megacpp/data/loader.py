"""Read a prepared snapshot: validate it, and stream batches for training.

    snap = open_snapshot("data/sys")               # checks schema, files, hashes
    tok = load_tokenizer(snap)                     # HF tokenizers.Tokenizer
    loader = PackedLoader(snap, "train", batch_size=8, seed=0, rank=r, world_size=w)
    for batch in loader:                           # dict of torch tensors, (B, T) each
        ...
        ckpt["data"] = loader.state_dict()         # resume later with load_state_dict

A batch, with T = seq_len:
    input_ids  (B, T) int64  row tokens 0..T-1
    labels     (B, T) int64  row tokens 1..T; -100 where the next token belongs to
                             another document or is padding
    doc_ids    (B, T) int32  segment id within the row (0, 1, ... in order), -1 at
                             padding: attention may only look within equal ids
    positions  (B, T) int64  position within the document (for RoPE); a row's
                             first segment may start mid-document

Order: each epoch is a permutation of all rows of the split drawn from
(seed, epoch). Rank r of w takes every w-th row of it, starting at r, so the
ranks never share a row and together cover the epoch. With drop_last=True
every rank yields the same number of full batches (what data-parallel
training needs) and the few rows left over differ from epoch to epoch.
"""
from __future__ import annotations

import hashlib
import json
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from megacpp.data.schema import MANIFEST_NAME, SCHEMA_VERSION, SPLITS, check_shard_schema
from megacpp.data.tokenizer import load_tokenizer  # noqa: F401  (public helper re-exported here)
from megacpp.errors import DataError

__all__ = ["IGNORE_INDEX", "PackedLoader", "Snapshot", "load_tokenizer", "make_batch", "manifest_digest", "open_snapshot", "read_split"]

IGNORE_INDEX = -100
_STATE_VERSION = 1


@dataclass(frozen=True)
class Snapshot:
    """A validated snapshot directory; `manifest` is the parsed snapshot.json."""

    path: Path
    manifest: dict = field(repr=False)
    snapshot_id: str
    schema_version: int
    tokenizer_path: Path
    tokenizer_sha256: str
    vocab_size: int  # the tokenizer's size: every token id is below it
    seq_len: int  # a row holds seq_len + 1 tokens
    special_ids: dict  # {"pad", "bos", "eos"} -> id
    split_rows: dict  # split -> number of packed rows

    def shards(self, split: str) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["splits"][split]["shards"]]

    def split_tokens(self, split: str) -> int:
        """Document tokens (BOS and EOS included, padding excluded) in a split."""
        return int(self.manifest["splits"][split]["tokens"])


def manifest_digest(manifest: dict) -> str:
    """The snapshot id: sha256 of the canonical JSON of everything but the id itself."""
    body = {k: v for k, v in manifest.items() if k != "snapshot_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _field(manifest: dict, where: Path, *keys: str):
    node = manifest
    for i, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            raise DataError(f"{where}: field '{'.'.join(keys[: i + 1])}' is missing")
        node = node[key]
    return node


def open_snapshot(path: str | Path, verify: bool = True) -> Snapshot:
    """Open and validate a snapshot directory.

    Checks: snapshot.json parses, its schema_version is this reader's, the id
    matches the contents, every listed file exists with the recorded size (and
    sha256 when `verify`), and every shard's parquet footer has the expected
    schema and row count. Each failure raises one DataError naming the file.
    """
    if isinstance(path, Snapshot):
        return path
    root = Path(path)
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise DataError(f"{mpath}: missing; {root} is not a megacpp data snapshot")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{mpath}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{mpath}: not a JSON object")
    version = _field(manifest, mpath, "schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(f"{mpath}: schema_version is {version}, this reader expects {SCHEMA_VERSION}")
    if _field(manifest, mpath, "snapshot_id") != manifest_digest(manifest):
        raise DataError(f"{mpath}: snapshot_id does not match the manifest's contents (edited by hand?)")
    seq_len = int(_field(manifest, mpath, "seq_len"))
    files = _field(manifest, mpath, "files")
    for rel, rec in sorted(files.items()):
        fpath = root / rel
        if not fpath.is_file():
            raise DataError(f"{fpath}: missing (listed in {MANIFEST_NAME} files)")
        size = fpath.stat().st_size
        if size != rec["bytes"]:
            raise DataError(f"{fpath}: size is {size} bytes, {MANIFEST_NAME} says {rec['bytes']} (truncated or replaced)")
        if verify:
            h = hashlib.sha256()
            with open(fpath, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
            if h.hexdigest() != rec["sha256"]:
                raise DataError(f"{fpath}: sha256 does not match {MANIFEST_NAME} (file corrupt or modified)")
    split_rows = {}
    for split in SPLITS:
        info = _field(manifest, mpath, "splits", split)
        for shard in info["shards"]:
            spath = root / shard["file"]
            if shard["file"] not in files:
                raise DataError(f"{spath}: shard not listed in {MANIFEST_NAME} files")
            pf = check_shard_schema(spath, seq_len)
            if pf.metadata.num_rows != shard["rows"]:
                raise DataError(f"{spath}: has {pf.metadata.num_rows} rows, {MANIFEST_NAME} says {shard['rows']}")
        split_rows[split] = sum(s["rows"] for s in info["shards"])
    tok = _field(manifest, mpath, "tokenizer")
    return Snapshot(
        path=root,
        manifest=manifest,
        snapshot_id=manifest["snapshot_id"],
        schema_version=version,
        tokenizer_path=root / _field(manifest, mpath, "tokenizer", "file"),
        tokenizer_sha256=_field(manifest, mpath, "tokenizer", "sha256"),
        vocab_size=int(_field(manifest, mpath, "tokenizer", "vocab_size")),
        seq_len=seq_len,
        special_ids=dict(tok["special_ids"]),
        split_rows=split_rows,
    )


def read_split(snapshot: Snapshot, split: str, columns=("tokens", "doc_index", "positions")) -> dict[str, np.ndarray]:
    """All rows of a split as (rows, seq_len + 1) numpy arrays, one per column."""
    length = snapshot.seq_len + 1
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for shard in snapshot.shards(split):
        try:
            table = pq.read_table(shard, columns=list(columns))
        except Exception as exc:  # damaged pages surface only when read
            raise DataError(f"{shard}: cannot be read ({exc})") from None
        for c in columns:
            flat = table.column(c).combine_chunks().values.to_numpy(zero_copy_only=False)
            parts[c].append(flat.reshape(-1, length))
    dtypes = {"tokens": np.int32, "doc_index": np.int32, "positions": np.int32, "source_ids": np.int16}
    return {
        c: np.concatenate(p) if p else np.zeros((0, length), dtype=dtypes[c]) for c, p in parts.items()
    }


def make_batch(tokens: np.ndarray, doc_index: np.ndarray, positions: np.ndarray) -> dict[str, torch.Tensor]:
    """Turn (B, T+1) packed rows into the training tensors described in the module doc."""
    cur, nxt = doc_index[:, :-1], doc_index[:, 1:]
    labels = tokens[:, 1:].astype(np.int64)
    labels[(nxt != cur) | (nxt < 0)] = IGNORE_INDEX
    segments = np.zeros(cur.shape, dtype=np.int32)
    np.cumsum(cur[:, 1:] != cur[:, :-1], axis=1, out=segments[:, 1:])
    segments[cur < 0] = -1
    return {
        "input_ids": torch.from_numpy(tokens[:, :-1].astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "doc_ids": torch.from_numpy(segments),
        "positions": torch.from_numpy(positions[:, :-1].astype(np.int64)),
    }


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


class PackedLoader:
    """Deterministic, rank-sharded, resumable batches of packed rows.

    snapshot: a snapshot directory or an open Snapshot. split: train, val or
    test. epochs: how many passes before iteration stops (None: forever).
    drop_last: yield only full batches, the same number on every rank.
    prefetch: batches prepared ahead by a background thread.

    The whole split is held in memory (about 12 bytes per token).
    `state_dict()` records the position after the last batch handed out, so
    `load_state_dict()` on a fresh loader continues with exactly the next batch.
    """

    def __init__(
        self,
        snapshot: str | Path | Snapshot,
        split: str,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epochs: int | None = None,
        *,
        drop_last: bool = False,
        prefetch: int = 4,
        pin_memory: bool = False,
        verify: bool = True,
    ):
        if split not in SPLITS:
            raise DataError(f"split: '{split}' is not one of {', '.join(SPLITS)}")
        if batch_size < 1:
            raise DataError(f"batch_size: must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank/world_size: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if epochs is not None and epochs < 1:
            raise DataError(f"epochs: must be >= 1 or None, got {epochs}")
        self.snapshot = open_snapshot(snapshot, verify=verify)
        self.split, self.batch_size, self.seed = split, batch_size, seed
        self.rank, self.world_size, self.epochs = rank, world_size, epochs
        self.drop_last, self.prefetch, self.pin_memory = drop_last, max(1, prefetch), pin_memory
        data = read_split(self.snapshot, split)
        self._tokens, self._docs, self._pos = data["tokens"], data["doc_index"], data["positions"]
        self.num_rows = int(self._tokens.shape[0])
        if self.num_rows == 0:
            raise DataError(f"{self.snapshot.path / MANIFEST_NAME}: split '{split}' has no rows")
        per_rank = len(range(rank, self.num_rows, world_size))
        if drop_last:
            self._rows_per_epoch = (self.num_rows // world_size) // batch_size * batch_size
            if self._rows_per_epoch == 0:
                raise DataError(
                    f"batch_size: {batch_size} x world_size {world_size} exceeds the {self.num_rows} rows of split '{split}' with drop_last"
                )
        else:
            self._rows_per_epoch = per_rank
        self._epoch, self._batch = 0, 0
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None
        self._queue: queue.Queue | None = None

    # ------------------------------------------------------------ order

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return -(-self._rows_per_epoch // self.batch_size)

    def rows_for_epoch(self, epoch: int) -> np.ndarray:
        """Row indices this rank reads in `epoch`, in order."""
        perm = np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_rows)
        return perm[self.rank :: self.world_size][: self._rows_per_epoch]

    def _batch_at(self, rows: np.ndarray, index: int) -> dict[str, torch.Tensor]:
        pick = rows[index * self.batch_size : (index + 1) * self.batch_size]
        batch = make_batch(self._tokens[pick], self._docs[pick], self._pos[pick])
        if self.pin_memory and torch.cuda.is_available():
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Position after the last batch returned, plus what it is only valid for."""
        return {
            "version": _STATE_VERSION,
            "snapshot_id": self.snapshot.snapshot_id,
            "split": self.split,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "batch_size": self.batch_size,
            "drop_last": self.drop_last,
            "epoch": self._epoch,
            "batch": self._batch,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`; refuses one made for other data or another layout."""
        for key in ("snapshot_id", "split", "seed", "rank", "world_size", "batch_size", "drop_last"):
            mine = getattr(self.snapshot, key) if key == "snapshot_id" else getattr(self, key)
            if state.get(key) != mine:
                raise DataError(f"loader state: field '{key}' is {state.get(key)!r}, this loader has {mine!r}")
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if not 0 <= batch <= len(self):
            raise DataError(f"loader state: field 'batch' is {batch}, an epoch has {len(self)} batches")
        self._stop_worker()
        self._epoch, self._batch = epoch, batch

    # ------------------------------------------------------------ iteration

    def __iter__(self):
        self._stop_worker()
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(
            target=self._produce, args=(self._epoch, self._batch, self._stop, self._queue), daemon=True, name="megacpp-prefetch"
        )
        self._thread.start()
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._queue is None:
            iter(self)
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # later calls keep raising StopIteration
            raise StopIteration
        if isinstance(item, _Failure):
            raise item.exc
        epoch, index, batch = item
        self._epoch, self._batch = (epoch + 1, 0) if index + 1 >= len(self) else (epoch, index + 1)
        return batch

    def _produce(self, epoch: int, index: int, stop: threading.Event, out: queue.Queue) -> None:
        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            if index >= len(self):
                epoch, index = epoch + 1, 0
            while self.epochs is None or epoch < self.epochs:
                rows = self.rows_for_epoch(epoch)
                for i in range(index, len(self)):
                    if not put((epoch, i, self._batch_at(rows, i))):
                        return
                epoch, index = epoch + 1, 0
            put(_END)
        except BaseException as exc:  # hand the error to the consumer instead of dying silently
            put(_Failure(exc))

    def _stop_worker(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self._thread = self._stop = self._queue = None

    def close(self) -> None:
        """Stop the prefetch thread (iteration can be restarted from the current state)."""
        self._stop_worker()

    def __del__(self):
        try:
            self._stop_worker()
        except Exception:
            pass
