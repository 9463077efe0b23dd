"""PackedLoader: batch semantics, determinism, resume, rank sharding; snapshot validation errors."""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_testutil import SMALL, make_tree

from megacpp.data.loader import IGNORE_INDEX, PackedLoader, load_tokenizer, manifest_digest, open_snapshot, read_split
from megacpp.data.prepare import prepare_snapshot
from megacpp.data.sources import sha256_file
from megacpp.errors import DataError


@pytest.fixture(scope="module")
def snap_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    tree = make_tree(root / "src", n_files=80, seed=3)
    # Short rows: many document boundaries per row and enough rows to shard.
    cfg = dataclasses.replace(SMALL, seq_len=24, rows_per_shard=40)
    return prepare_snapshot(root / "snap", [f"dir:{tree}"], cfg).path


def _rows(batches) -> list[tuple]:
    return [tuple(r) for b in batches for r in b["input_ids"].tolist()]


def test_batch_fields_follow_the_packed_rows(snap_dir):
    snap = open_snapshot(snap_dir)
    loader = PackedLoader(snap_dir, "train", batch_size=8, seed=1, epochs=1, prefetch=2)
    raw = read_split(snap, "train")
    order = loader.rows_for_epoch(0)
    pad = snap.special_ids["pad"]
    seen = 0
    for n, batch in enumerate(loader):
        rows = order[n * 8 : (n + 1) * 8]
        tok, doc, pos = raw["tokens"][rows], raw["doc_index"][rows], raw["positions"][rows]
        t = snap.seq_len
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (len(rows), t)
        assert batch["labels"].dtype == torch.long and batch["positions"].dtype == torch.long
        assert batch["doc_ids"].dtype == torch.int32
        assert (batch["input_ids"].numpy() == tok[:, :-1]).all()
        assert (batch["positions"].numpy() == pos[:, :-1]).all()
        labels = batch["labels"].numpy()
        same_doc = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)
        assert (labels[same_doc] == tok[:, 1:][same_doc]).all()
        assert (labels[~same_doc] == IGNORE_INDEX).all()
        assert (labels[tok[:, 1:] == pad] == IGNORE_INDEX).all()
        seg = batch["doc_ids"].numpy()
        for r in range(len(rows)):
            d = doc[r, :-1]
            real = d >= 0
            assert (seg[r][~real] == -1).all()
            # segment ids count up by one exactly where the document changes
            _, first = np.unique(d[real], return_index=True)
            assert sorted(seg[r][real][sorted(first)].tolist()) == list(range(len(first)))
            assert ((seg[r][real][1:] != seg[r][real][:-1]) == (d[real][1:] != d[real][:-1])).all()
        seen += len(rows)
    assert seen == snap.split_rows["train"] == loader.num_rows
    with pytest.raises(StopIteration):
        next(loader)


def test_same_seed_same_order_other_seed_other_order(snap_dir):
    a = _rows(PackedLoader(snap_dir, "train", 4, seed=5, epochs=1))
    b = _rows(PackedLoader(snap_dir, "train", 4, seed=5, epochs=1))
    c = _rows(PackedLoader(snap_dir, "train", 4, seed=6, epochs=1))
    assert a == b and a != c and sorted(a) == sorted(c)
    two = _rows(PackedLoader(snap_dir, "train", 4, seed=5, epochs=2))
    assert two[: len(a)] == a and two[len(a) :] != a and sorted(two[len(a) :]) == sorted(a)


@pytest.mark.parametrize("stop_after", [1, 7, 17, 25])
def test_resume_mid_epoch_equals_uninterrupted(snap_dir, stop_after):
    kwargs = dict(batch_size=3, seed=11, rank=1, world_size=2, epochs=2)
    full = _rows(PackedLoader(snap_dir, "train", **kwargs))
    first = PackedLoader(snap_dir, "train", prefetch=4, **kwargs)
    head = []
    for _ in range(stop_after):
        head.append(next(first))
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    first.close()
    second = PackedLoader(snap_dir, "train", **kwargs)
    second.load_state_dict(state)
    assert _rows(head) + _rows(second) == full
    assert second.state_dict()["epoch"] == 2


def test_ranks_partition_every_epoch(snap_dir):
    n = open_snapshot(snap_dir).split_rows["train"]
    world = 3
    loaders = [PackedLoader(snap_dir, "train", 4, seed=2, rank=r, world_size=world, epochs=1) for r in range(world)]
    for epoch in (0, 1):
        parts = [set(ld.rows_for_epoch(epoch).tolist()) for ld in loaders]
        assert sum(len(p) for p in parts) == n and set().union(*parts) == set(range(n))
    rows = [_rows(ld) for ld in loaders]
    everything = _rows(PackedLoader(snap_dir, "train", 4, seed=2, epochs=1))
    assert sorted(sum(rows, [])) == sorted(everything)
    even = [PackedLoader(snap_dir, "train", 4, seed=2, rank=r, world_size=world, drop_last=True) for r in range(world)]
    assert len({len(ld) for ld in even}) == 1
    batches = list(itertools.islice(iter(even[0]), len(even[0])))
    assert all(b["input_ids"].shape[0] == 4 for b in batches)
    even[0].close()
    overlap = set.intersection(*[set(ld.rows_for_epoch(0).tolist()) for ld in even])
    assert not overlap


def test_state_for_other_data_is_refused(snap_dir):
    a = PackedLoader(snap_dir, "train", 4, seed=1)
    b = PackedLoader(snap_dir, "train", 4, seed=2)
    with pytest.raises(DataError, match="loader state: field 'seed'"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(DataError, match="rank/world_size"):
        PackedLoader(snap_dir, "train", 4, rank=2, world_size=2)


def _copy(snap_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(snap_dir, dst)
    return dst


def test_corrupt_shard_is_named(snap_dir, tmp_path):
    d = _copy(snap_dir, tmp_path)
    shard = d / "train" / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"shard-00001\.parquet: sha256 does not match"):
        open_snapshot(d)
    with pytest.raises(DataError, match=r"shard-00001\.parquet: sha256"):
        PackedLoader(d, "train", 4)


def test_truncated_shard_is_named(snap_dir, tmp_path):
    d = _copy(snap_dir, tmp_path)
    shard = d / "val" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"val/shard-00000\.parquet: size is \d+ bytes.*truncated"):
        open_snapshot(d, verify=False)


def test_unreadable_shard_with_matching_manifest_is_named(snap_dir, tmp_path):
    # Even with sizes and hashes updated to match, a file that is not parquet is named.
    d = _copy(snap_dir, tmp_path)
    shard = d / "test" / "shard-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: -300])
    _rewrite_manifest(d, shard)
    with pytest.raises(DataError, match=r"test/shard-00000\.parquet: not a readable parquet shard"):
        open_snapshot(d)


def _rewrite_manifest(d, changed, edit=None):
    mpath = d / "snapshot.json"
    m = json.loads(mpath.read_text())
    rel = changed.relative_to(d).as_posix()
    m["files"][rel] = {"bytes": changed.stat().st_size, "sha256": sha256_file(changed)}
    if edit:
        edit(m)
    m["snapshot_id"] = manifest_digest(m)
    mpath.write_text(json.dumps(m))


def test_schema_version_mismatch_is_named(snap_dir, tmp_path):
    d = _copy(snap_dir, tmp_path)
    mpath = d / "snapshot.json"
    m = json.loads(mpath.read_text())
    m["schema_version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"snapshot\.json: schema_version is 99, this reader expects 1"):
        open_snapshot(d)
    # A shard written by another schema version is caught by its own metadata.
    d2 = tmp_path / "d2"
    d2 = _copy(snap_dir, d2)
    shard = d2 / "train" / "shard-00000.parquet"
    table = pq.read_table(shard)
    meta = dict(table.schema.metadata)
    meta[b"megacpp.schema_version"] = b"2"
    pq.write_table(table.replace_schema_metadata(meta), shard)
    _rewrite_manifest(d2, shard)
    with pytest.raises(DataError, match=r"train/shard-00000\.parquet: schema_version is 2"):
        open_snapshot(d2)
    # And a column of the wrong type is named with its column.
    d3 = _copy(snap_dir, tmp_path / "d3")
    shard = d3 / "train" / "shard-00000.parquet"
    table = pq.read_table(shard)
    cast = table.set_column(0, "tokens", table.column("tokens").cast(pa.list_(pa.int64(), 25)))
    pq.write_table(cast, shard)
    _rewrite_manifest(d3, shard)
    with pytest.raises(DataError, match=r"shard-00000\.parquet: column 'tokens' has type"):
        open_snapshot(d3)


def test_truncated_tokenizer_is_named(snap_dir, tmp_path):
    d = _copy(snap_dir, tmp_path)
    opened = open_snapshot(d)
    tok = d / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[:500])
    with pytest.raises(DataError, match=r"tokenizer\.json: size is 500 bytes"):
        open_snapshot(d)
    with pytest.raises(DataError, match=r"tokenizer\.json: sha256 does not match"):
        load_tokenizer(opened)  # truncated after the snapshot was opened
    with pytest.raises(DataError, match=r"tokenizer\.json: not a readable tokenizer"):
        load_tokenizer(tok)
    # Manifest rewritten to match the truncated file: parsing still names it.
    _rewrite_manifest(d, tok, edit=lambda m: m["tokenizer"].update(sha256=sha256_file(tok)))
    with pytest.raises(DataError, match=r"tokenizer\.json: not a readable tokenizer"):
        load_tokenizer(open_snapshot(d))


def test_missing_manifest_field_and_edited_manifest(snap_dir, tmp_path):
    d = _copy(snap_dir, tmp_path)
    mpath = d / "snapshot.json"
    m = json.loads(mpath.read_text())
    m["splits"]["train"]["documents"] += 1
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match="snapshot_id does not match"):
        open_snapshot(d)
    del m["tokenizer"]
    m["snapshot_id"] = manifest_digest(m)
    mpath.write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"snapshot\.json: field 'tokenizer' is missing"):
        open_snapshot(d)
