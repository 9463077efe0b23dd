"""Every op's Triton kernels under the CPU interpreter (TRITON_INTERPRET=1), so CI
without a GPU runs the kernels themselves against their references: each op's
test file marks its interpreter tests `cpu_interp` and names its child variable
and their count (INTERP_CHILD); they all run here in one child process."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest

from ops_testutil import run_interpreter_children

HAS_TRITON = importlib.util.find_spec("triton") is not None
# each op folder with Triton kernels (src/megacpp/ops/<op>/triton_*.py) -> its test module
OP_TESTS = {"ssd": "test_ssd_triton", "causal_conv": "test_causal_conv", "delta_rule": "test_delta_rule_triton",
            "linear_ce": "test_linear_ce_triton", "gated_norm": "test_gated_norm", "swiglu": "test_swiglu",
            "fp8_grouped": "test_fp8_grouped"}


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_every_ops_triton_kernels_under_the_interpreter_on_cpu():
    specs = []
    for name in OP_TESTS.values():
        mod = importlib.import_module(name)
        var, n = mod.INTERP_CHILD
        specs.append((mod.__file__, var, n))
    run_interpreter_children(specs)


def test_every_op_with_triton_kernels_is_listed():
    """An op folder with Triton kernels missing from OP_TESTS would never run
    under the interpreter; a listed one without kernels is stale."""
    ops = Path(__file__).resolve().parents[2] / "src" / "megacpp" / "ops"
    assert {p.parent.name for p in ops.glob("*/triton_*.py")} == set(OP_TESTS)
