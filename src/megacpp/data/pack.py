"""Pack tokenized documents into fixed-length rows and write parquet shards.

Each split is one token stream: for every document, in the split's order,
BOS + tokens + EOS. The stream is cut into rows of `seq_len + 1` tokens (a
document may continue into the next row; its positions keep counting), and
the last row is filled with PAD. Nothing is truncated, so concatenating the
rows and cutting at BOS/EOS gives back every document.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from megacpp.data.schema import ROW_COLUMNS, row_schema


@dataclass
class PackedSplit:
    columns: dict[str, np.ndarray]  # column name -> (rows, seq_len + 1)
    starts: np.ndarray  # int64 offset of each document's BOS in the stream
    doc_tokens: int  # tokens that belong to documents (BOS and EOS included)
    pad_tokens: int

    @property
    def rows(self) -> int:
        return int(self.columns["tokens"].shape[0])


def pack_documents(
    token_arrays: list[np.ndarray],
    doc_indices: list[int],
    input_ids: list[int],
    seq_len: int,
    bos: int,
    eos: int,
    pad: int,
) -> PackedSplit:
    """Lay documents out as BOS + ids + EOS in one stream and cut it into rows."""
    length = seq_len + 1
    lengths = np.array([a.size + 2 for a in token_arrays], dtype=np.int64)
    total = int(lengths.sum())
    rows = -(-total // length)
    padded = rows * length
    starts = np.zeros(len(token_arrays), dtype=np.int64)
    if len(token_arrays) > 1:
        starts[1:] = np.cumsum(lengths)[:-1]
    b, e = np.array([bos], np.int32), np.array([eos], np.int32)
    parts = []
    for a in token_arrays:
        parts += (b, a.astype(np.int32, copy=False), e)
    tokens = np.full(padded, pad, dtype=np.int32)
    doc = np.full(padded, -1, dtype=np.int32)
    pos = np.zeros(padded, dtype=np.int32)
    src = np.full(padded, -1, dtype=np.int16)
    if total:
        tokens[:total] = np.concatenate(parts)
        doc[:total] = np.repeat(np.asarray(doc_indices, dtype=np.int32), lengths)
        pos[:total] = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        src[:total] = np.repeat(np.asarray(input_ids, dtype=np.int16), lengths)
    columns = {
        "tokens": tokens.reshape(rows, length),
        "doc_index": doc.reshape(rows, length),
        "positions": pos.reshape(rows, length),
        "source_ids": src.reshape(rows, length),
    }
    return PackedSplit(columns, starts, total, padded - total)


def _table(columns: dict[str, np.ndarray], lo: int, hi: int, seq_len: int) -> pa.Table:
    schema = row_schema(seq_len)
    arrays = []
    for name in ROW_COLUMNS:
        flat = pa.array(np.ascontiguousarray(columns[name][lo:hi]).reshape(-1))
        arrays.append(pa.FixedSizeListArray.from_arrays(flat, seq_len + 1))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shards(packed: PackedSplit, out_dir: Path, rel_dir: str, seq_len: int, rows_per_shard: int) -> list[dict]:
    """Write the split's rows as shard-NNNNN.parquet files; return one record per shard."""
    (out_dir / rel_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for n, lo in enumerate(range(0, packed.rows, rows_per_shard)):
        hi = min(lo + rows_per_shard, packed.rows)
        rel = f"{rel_dir}/shard-{n:05d}.parquet"
        path = out_dir / rel
        # Statistics on list columns say nothing useful; zstd keeps shards small.
        pq.write_table(
            _table(packed.columns, lo, hi, seq_len),
            path,
            compression="zstd",
            write_statistics=False,
            row_group_size=rows_per_shard,
        )
        data = path.read_bytes()
        records.append({"file": rel, "rows": hi - lo, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return records
