"""The Triton gated delta rule is opt-in (MEGACPP_DELTA_RULE=triton): by default the R
layers call the reference, and the manifest says which rule ran and why."""
from __future__ import annotations

import pytest
import torch

from megacpp.model import recurrent
from megacpp.ops.delta_rule.reference import gated_delta_rule

from model_testutil import FAMILY_SPECS, build


def _calls(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("MEGACPP_DELTA_RULE", raising=False)
    else:
        monkeypatch.setenv("MEGACPP_DELTA_RULE", env)
    seen = []
    ref = gated_delta_rule
    monkeypatch.setattr(recurrent, "gated_delta_rule", lambda *a, **k: seen.append("reference") or ref(*a, **k))
    # the wiring only: the stand-in for the dispatcher computes with the reference
    monkeypatch.setattr(recurrent, "gated_delta_rule_fast", lambda *a, **k: seen.append("fast") or ref(*a, **k))
    model = build(FAMILY_SPECS["gated_deltanet"], torch.float32)
    model(torch.randint(0, 97, (2, 20)))
    return seen


def test_reference_by_default(monkeypatch):
    assert _calls(monkeypatch, None) == ["reference"]


def test_opt_in_takes_the_dispatcher(monkeypatch):
    assert _calls(monkeypatch, "triton") == ["fast"]


def test_opt_in_where_triton_cannot_run_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MEGACPP_DELTA_RULE", "triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA here: the kernel may run (benchmarks/delta_rule_kernel_check.py covers it)")
    model = build(FAMILY_SPECS["gated_deltanet"], torch.float32)
    with pytest.raises(RuntimeError, match="MEGACPP_DELTA_RULE=triton, but the Triton gated delta rule cannot run"):
        model(torch.randint(0, 97, (2, 20)))
