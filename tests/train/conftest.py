"""Shared fixtures for trainer tests: one small real-C++ snapshot per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megacpp.data.prepare import PrepareConfig, prepare_snapshot

from train_testutil import SEQ, VOCAB


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("snap")
    src = root / "src"
    # real C++: a slice of the libstdc++ headers every machine with g++ has
    headers = sorted(Path("/usr/include/c++").glob("*/bits/*.h"))[:120]
    if not headers:
        pytest.skip("no libstdc++ headers on this machine")
    src.mkdir()
    for h in headers:
        shutil.copy(h, src / h.name)
    cfg = PrepareConfig(vocab_size=VOCAB, seq_len=SEQ, max_bytes=1 << 20, split=(0.8, 0.1, 0.1))
    prepare_snapshot(root / "snap", [f"dir:{src}"], cfg)
    return root / "snap"
