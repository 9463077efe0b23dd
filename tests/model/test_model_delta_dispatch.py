"""The R layers call the delta-rule dispatcher: Triton on CUDA, the reference
elsewhere or with MEGACPP_DELTA_RULE=reference; a forced Triton rule that
cannot run is one clear error."""
from __future__ import annotations

import pytest
import torch

from megacpp.model import recurrent
from megacpp.ops.delta_rule import dispatch
from megacpp.ops.delta_rule.reference import gated_delta_rule

from model_testutil import FAMILY_SPECS, build


def _calls(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("MEGACPP_DELTA_RULE", raising=False)
    else:
        monkeypatch.setenv("MEGACPP_DELTA_RULE", env)
    seen = []
    ref = dispatch.gated_delta_rule_reference
    monkeypatch.setattr(dispatch, "gated_delta_rule_reference", lambda *a, **k: seen.append("reference") or ref(*a, **k))
    model = build(FAMILY_SPECS["gated_deltanet"], torch.float32)
    model(torch.randint(0, 97, (2, 20)))
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CPU the dispatcher must pick the reference")
@pytest.mark.parametrize("env", [None, "auto", "reference"])
def test_cpu_layers_reach_the_reference_through_the_dispatcher(monkeypatch, env):
    assert _calls(monkeypatch, env) == ["reference"]


def test_layers_call_the_dispatcher(monkeypatch):
    """R layers go through the dispatcher, handing it policy.kernels.delta_states."""
    from megacpp.train.activation import apply_delta_states
    seen = []
    monkeypatch.setattr(recurrent, "gated_delta_rule_fast",
                        lambda *a, keep_states, **k: seen.append(("fast", keep_states)) or gated_delta_rule(*a, **k))
    model = build(FAMILY_SPECS["gated_deltanet"], torch.float32)
    model(torch.randint(0, 97, (2, 20)))
    assert apply_delta_states(model, "keep") == 1
    model(torch.randint(0, 97, (2, 20)))
    assert seen == [("fast", False), ("fast", True)]
    with pytest.raises(ValueError, match="policy.kernels.delta_states = 'always'"):
        apply_delta_states(model, "always")


def test_forced_triton_where_it_cannot_run_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("MEGACPP_DELTA_RULE", "triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA here: the kernel may run (benchmarks/delta_rule_kernel_check.py covers it)")
    model = build(FAMILY_SPECS["gated_deltanet"], torch.float32)
    with pytest.raises(RuntimeError, match="MEGACPP_DELTA_RULE=triton, but the Triton gated delta rule cannot run"):
        model(torch.randint(0, 97, (2, 20)))
