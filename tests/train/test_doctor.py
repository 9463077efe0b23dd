"""`megacpp doctor`'s table: one row per hot path, and each reason agrees
with the choice the model code makes on this machine."""
from __future__ import annotations

import pytest
import torch

from megacpp import doctor
from megacpp.model import attention


def _by_path(device="cpu"):
    return {r["path"]: r for r in doctor.rows(torch.device(device))}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rows")
def test_cpu_rows_name_every_hot_path_and_why(monkeypatch):
    monkeypatch.delenv("MEGACPP_ATTENTION", raising=False)
    rows = _by_path()
    for path in ("SSD scan (Mamba-2/3)", "short causal conv (M, R)", "gated RMSNorm (M, R outputs)",
                 "SwiGLU (F, E layers)", "gated delta rule (R)",
                 "attention (packed documents)", "FP8 (torchao)"):
        assert path in rows, path
    assert "no CUDA" in rows["SSD scan (Mamba-2/3)"]["why_not"]
    assert rows["gated RMSNorm (M, R outputs)"]["runs"] == "pure-torch reference (ops.gated_norm)"
    assert rows["SwiGLU (F, E layers)"]["runs"].startswith("pure-torch reference")
    assert rows["SwiGLU (F, E layers)"]["why_not"] == "Triton SwiGLU: no CUDA"
    packed = rows["attention (packed documents)"]
    assert packed["runs"].startswith("SDPA") and "CUDA only" in packed["why_not"]


def test_packed_attention_row_follows_the_forced_backend(monkeypatch):
    if attention._flex_attention is None:
        pytest.skip("torch without FlexAttention")
    monkeypatch.setenv("MEGACPP_ATTENTION", "flex")
    assert _by_path()["attention (packed documents)"]["runs"].startswith("FlexAttention")
    monkeypatch.setenv("MEGACPP_ATTENTION", "sdpa")
    row = _by_path()["attention (packed documents)"]
    assert row["runs"].startswith("SDPA") and "forces SDPA" in row["why_not"]
    monkeypatch.setenv("MEGACPP_ATTENTION", "flash")
    assert "expected one of" in _by_path()["attention (packed documents)"]["why_not"]
