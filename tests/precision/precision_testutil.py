"""Helpers for the precision tests: a small real-C++ snapshot and trainer overrides."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SEQ = 64
VOCAB = 512


@pytest.fixture(scope="session")
def precision_snapshot(tmp_path_factory) -> Path:
    from megacpp.data.prepare import PrepareConfig, prepare_snapshot

    root = tmp_path_factory.mktemp("precision_snap")
    headers = sorted(Path("/usr/include/c++").glob("*/bits/*.h"))[:60]
    if not headers:
        pytest.skip("no libstdc++ headers on this machine")
    src = root / "src"
    src.mkdir()
    for h in headers:
        shutil.copy(h, src / h.name)
    cfg = PrepareConfig(vocab_size=VOCAB, seq_len=SEQ, max_bytes=1 << 19, split=(0.8, 0.1, 0.1))
    prepare_snapshot(root / "snap", [f"dir:{src}"], cfg)
    return root / "snap"


def tiny_sets(**extra) -> list[str]:
    sets = {
        "model.vocab_size": VOCAB, "policy.seq_len": SEQ, "policy.micro_batch": 4,
        "policy.global_batch": 8, "policy.steps": 6, "policy.eval_interval": 100,
        "policy.eval_batches": 0, "policy.checkpoint_interval": 100, "policy.log_interval": 1,
        "policy.precision.compute": "fp32", "policy.schedule.warmup_steps": 2,
        "policy.aux.stp.enabled": "false", "model.attention.index_topk": 16,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]
