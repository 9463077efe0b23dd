"""Byte-level BPE tokenizer: trained on the train split, saved with the snapshot.

Byte-level means every byte sequence is encodable and decoding is exact, so
decode(encode(text)) == text for any document. The special tokens
<|pad|>, <|bos|>, <|eos|> get ids 0, 1, 2; they are never produced by
encoding text (they are added by packing only).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megacpp.data.schema import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, SPECIAL_TOKENS
from megacpp.errors import DataError

if TYPE_CHECKING:
    from megacpp.data.loader import Snapshot


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` entries (special tokens included)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab_size: {vocab_size} is too small for a byte-level BPE (need > 259)")
    tok = Tokenizer(models.BPE())
    # No prefix space: code documents start wherever they start.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> str:
    """Write tokenizer.json and return its sha256."""
    data = tok.to_str(pretty=False).encode("utf-8")
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def special_ids(tok: Tokenizer, where: str = "tokenizer") -> dict[str, int]:
    ids = {}
    for key, token in (("pad", PAD_TOKEN), ("bos", BOS_TOKEN), ("eos", EOS_TOKEN)):
        tid = tok.token_to_id(token)
        if tid is None:
            raise DataError(f"{where}: special token {token} is missing")
        ids[key] = tid
    return ids


def encode_documents(tok: Tokenizer, texts: list[str], batch_docs: int = 256) -> Iterator[np.ndarray]:
    """Token ids (int32) of each text, in order; encoding runs on all cores."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets needed
    for lo in range(0, len(texts), batch_docs):
        for enc in encode(texts[lo : lo + batch_docs], add_special_tokens=False):
            yield np.asarray(enc.ids, dtype=np.int32)


def load_tokenizer(snapshot: "Snapshot | str | Path") -> Tokenizer:
    """Load the snapshot's tokenizer, checking it against the manifest's sha256.

    Accepts a Snapshot (from `open_snapshot`), a snapshot directory, or a
    tokenizer.json path (then no hash is known and only parsing is checked).
    """
    expected = None
    if hasattr(snapshot, "tokenizer_path"):
        path, expected = Path(snapshot.tokenizer_path), snapshot.tokenizer_sha256
    else:
        path = Path(snapshot)
        if path.is_dir():
            from megacpp.data.loader import open_snapshot

            snap = open_snapshot(path, verify=False)
            path, expected = Path(snap.tokenizer_path), snap.tokenizer_sha256
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file is missing")
    data = path.read_bytes()
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise DataError(f"{path}: sha256 does not match the manifest's tokenizer.sha256 (file truncated or modified)")
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
        raise DataError(f"{path}: not a readable tokenizer ({str(exc).splitlines()[0]})") from None
    special_ids(tok, str(path))
    return tok
