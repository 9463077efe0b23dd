"""benchmarks/triton_registers.py: launches recorded under the interpreter, compiled offline for sm_90."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _tools() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


# The conv's launches recorded as triton_registers.survey(["conv"], sets=...)
# records them (its child's command line, `--record conv --set ...`, through
# main()), but all the launch sets in one child (PATH and LAUNCH restored in
# between) and at 32 steps x 64 channels instead of SHAPES' 256 x 256: under
# the interpreter the walks take a step per row of every program (~20 s at
# 256 x 256). Every integer argument (sizes, strides) is still 1 or a multiple
# of 16 as at SHAPES, so each launch has the same signature, constexprs and
# divisibility, i.e. compiles to the same kernel (checked when written:
# triton_registers._spec equal for every launch of the three sets at both
# shapes). survey() itself runs in the gated-norm and SwiGLU tests below.
_RECORD_CONV = """
import contextlib, copy, importlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import triton_registers as R
R.SHAPES["conv"] = dict(R.SHAPES["conv"], l=32, c=64)
mod = importlib.import_module(R.MODULES["conv"])
out = []
for sets in json.loads(sys.argv[2]):
    path, launch = dict(mod.PATH), copy.deepcopy(mod.LAUNCH)
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        R.main(["--record", "conv"] + [a for s in sets for a in ("--set", s)])
    out.append(json.loads(buf.getvalue()))
    mod.PATH.clear(); mod.PATH.update(path); mod.LAUNCH.clear(); mod.LAUNCH.update(launch)
print(json.dumps(out))
"""


def _conv_surveys(triton_registers, *sets_list):
    """[survey(["conv"], sets=s) for s in sets_list], recorded as above."""
    root = Path(triton_registers.__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(root / "src"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", _RECORD_CONV, str(root / "benchmarks"), json.dumps([list(s) for s in sets_list])]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    out = []
    for launches in json.loads(p.stdout):
        distinct = {json.dumps(launch, sort_keys=True): launch for launch in launches}
        out.append([triton_registers.resources("conv", launch, 90) for launch in distinct.values()])
    return out


@pytest.mark.skipif(not _tools(), reason="triton with its NVIDIA tools (ptxas, cuobjdump) not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU target")
def test_conv_launches_are_recorded_on_both_paths_and_rows_per_step_lower_dpre_registers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import triton_registers

    tiles = ("path:fwd=tiles", "path:bwd=tiles")
    walks, tiled, stepped = _conv_surveys(triton_registers, (), tiles, tiles + ("dpre:RT=32",))
    rows = {r["kernel"]: r for r in walks}
    # the default path: the walks, one warp a program
    assert sorted(rows) == ["_conv_bwd_walk_kernel", "_conv_fwd_walk_kernel"]
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0 and r["warps"] == 1
    rows = {r["kernel"]: r for r in tiled}
    assert sorted(rows) == ["_conv_dpre_kernel", "_conv_dx_kernel", "_conv_fwd_kernel"]
    for r in rows.values():
        assert 0 < r["registers"] <= 255 and r["stack"] >= 0 and r["warps"] == 4
    one_pass = rows["_conv_dpre_kernel"]
    assert one_pass["blocks"]["RT"] == one_pass["blocks"]["BT"]  # the default launch: one pass
    stepped = {r["kernel"]: r for r in stepped}
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
