"""On-disk layout of a data snapshot and the columns of its parquet shards.

A snapshot directory holds:

    snapshot.json        the manifest (inputs, counts, drops, tokenizer, files, id)
    tokenizer.json       the byte-level BPE tokenizer (HF `tokenizers` format)
    documents.parquet    one row per kept document: provenance and where it was packed
    <split>/shard-NNNNN.parquet   packed rows for split in train, val, test

Each packed row holds `seq_len + 1` tokens so that a row gives `seq_len`
inputs and `seq_len` next-token labels. Row columns (all fixed-size lists of
length `seq_len + 1`):

    tokens      int32  token ids; documents are BOS + text + EOS, padding is PAD
    doc_index   int32  global document index (row of documents.parquet), -1 at padding
    positions   int32  position within the document (BOS is 0), 0 at padding
    source_ids  int16  index into the manifest's `inputs`, -1 at padding

Bump SCHEMA_VERSION whenever any of this changes meaning; readers refuse
snapshots of another version instead of guessing.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megacpp.errors import DataError

SCHEMA_VERSION = 1
FORMAT = "megacpp.packed-rows"

MANIFEST_NAME = "snapshot.json"
TOKENIZER_NAME = "tokenizer.json"
DOCUMENTS_NAME = "documents.parquet"
SPLITS = ("train", "val", "test")

# Special tokens get the first ids, in this order, in every tokenizer we train.
PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)

ROW_COLUMNS = ("tokens", "doc_index", "positions", "source_ids")
_ROW_TYPES = {
    "tokens": pa.int32(),
    "doc_index": pa.int32(),
    "positions": pa.int32(),
    "source_ids": pa.int16(),
}
SCHEMA_VERSION_KEY = b"megacpp.schema_version"
ROW_LENGTH_KEY = b"megacpp.row_length"


def row_schema(seq_len: int) -> pa.Schema:
    """Arrow schema of a packed-row shard for rows of `seq_len + 1` tokens."""
    length = seq_len + 1
    fields = [pa.field(name, pa.list_(_ROW_TYPES[name], length), nullable=False) for name in ROW_COLUMNS]
    meta = {SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode(), ROW_LENGTH_KEY: str(length).encode()}
    return pa.schema(fields, metadata=meta)


DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_index", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("input_id", pa.int16(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),  # BOS + text + EOS
        pa.field("group", pa.int32(), nullable=False),  # near-duplicate group id
        pa.field("start", pa.int64(), nullable=False),  # offset of BOS in the split's token stream
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)


def check_shard_schema(path: Path, seq_len: int) -> pq.ParquetFile:
    """Open a shard's footer and check it against the expected row schema.

    Raises DataError naming the file (and the column) when the file is not
    readable parquet, was written by another schema version, or has columns
    of another type or row length.
    """
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except Exception as exc:  # pyarrow raises several types for damaged footers
        raise DataError(f"{path}: not a readable parquet shard ({exc})") from None
    meta = schema.metadata or {}
    found = meta.get(SCHEMA_VERSION_KEY, b"<missing>").decode()
    if found != str(SCHEMA_VERSION):
        raise DataError(f"{path}: schema_version is {found}, this reader expects {SCHEMA_VERSION}")
    expected = row_schema(seq_len)
    for field in expected:
        if field.name not in schema.names:
            raise DataError(f"{path}: column '{field.name}' is missing")
        got = schema.field(field.name).type
        if got != field.type:
            raise DataError(f"{path}: column '{field.name}' has type {got}, expected {field.type}")
    return pf
