"""benchmarks/triton_registers.py: launches recorded under the interpreter, compiled offline for sm_90."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest


def _tools() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


@pytest.mark.skipif(not _tools(), reason="triton with its NVIDIA tools (ptxas, cuobjdump) not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU target")
def test_conv_launches_are_recorded_on_both_paths_and_rows_per_step_lower_dpre_registers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import triton_registers

    rows = {r["kernel"]: r for r in triton_registers.survey(["conv"])}
    # the default path: the walks, one warp a program
    assert sorted(rows) == ["_conv_bwd_walk_kernel", "_conv_fwd_walk_kernel"]
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0 and r["warps"] == 1
    tiles = ("path:fwd=tiles", "path:bwd=tiles")
    rows = {r["kernel"]: r for r in triton_registers.survey(["conv"], sets=tiles)}
    assert sorted(rows) == ["_conv_dpre_kernel", "_conv_dx_kernel", "_conv_fwd_kernel"]
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0 and r["warps"] == 4
    one_pass = rows["_conv_dpre_kernel"]
    assert one_pass["blocks"]["RT"] == one_pass["blocks"]["BT"]  # the default launch: one pass
    stepped = {r["kernel"]: r for r in triton_registers.survey(["conv"], sets=tiles + ("dpre:RT=32",))}
    stepped = stepped["_conv_dpre_kernel"]
    assert stepped["blocks"]["RT"] == 32
    # 32 rows at a time keep less live than all 64: fewer registers plus spills
    assert stepped["registers"] + stepped["stack"] < one_pass["registers"] + one_pass["stack"]


@pytest.mark.skipif(not _tools(), reason="triton with its NVIDIA tools (ptxas, cuobjdump) not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU target")
def test_gated_norm_compiles_for_sm90_without_spills():
    """Both gated-norm kernels at nam-1b's Mamba-2 group (4096 channels) and its R
    heads (128): compiled for sm_90 at their launches (8192-element tiles; a warp
    per 1024 elements, at least one per 256 channels: 16 warps at 4096, 8 at 128),
    no stack."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import triton_registers

    rows = triton_registers.survey(["gnorm"])
    assert sorted({r["kernel"] for r in rows}) == ["_gnorm_bwd_kernel", "_gnorm_fwd_kernel"]
    assert {r["blocks"]["BG"] for r in rows} == {4096, 128}
    for r in rows:
        assert r["stack"] == 0 and 0 < r["registers"] <= 255, r
        assert r["warps"] == (16 if r["blocks"]["BG"] == 4096 else 8), r


@pytest.mark.skipif(not _tools(), reason="triton with its NVIDIA tools (ptxas, cuobjdump) not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU target")
def test_swiglu_compiles_for_sm90_without_spills():
    """Both SwiGLU kernels compile for sm_90 at their launches (4096-element
    tiles: 4 rows of 1024 columns at f 1408 and 2048), no stack: what the
    interpreter tests cannot show."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import triton_registers

    rows = triton_registers.survey(["swiglu"])
    assert sorted({r["kernel"] for r in rows}) == ["_swiglu_bwd_kernel", "_swiglu_fwd_kernel"]
    assert {(r["blocks"]["BR"], r["blocks"]["BF"]) for r in rows} == {(4, 1024)}
    for r in rows:
        assert r["stack"] == 0 and 0 < r["registers"] <= 255, r
