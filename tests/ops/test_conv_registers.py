"""benchmarks/conv_registers.py: the conv kernels compiled offline for sm_90 (no GPU)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _tools() -> bool:
    if not HAS_TRITON:
        return False
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return all(os.path.exists(os.path.join(bin_dir, t)) for t in ("ptxas", "cuobjdump"))


@pytest.mark.skipif(not _tools(), reason="triton with its NVIDIA tools (ptxas, cuobjdump) not installed")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiles for a GPU target")
def test_rows_per_step_lower_the_first_backward_pass_registers():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import conv_registers

    one_pass = conv_registers.resources("dpre", 64, 64, 128, 4)
    stepped = conv_registers.resources("dpre", 64, 16, 128, 4)
    assert 0 < stepped["registers"] <= 255 and 0 < one_pass["registers"] <= 255
    # 16 rows at a time keep less live than all 64: fewer registers plus spills
    assert stepped["registers"] + stepped["stack"] < one_pass["registers"] + one_pass["stack"]
    assert conv_registers.resources("dx", 64, 64, 128, 4)["registers"] > 0
