"""fp16 dynamic loss scaling, checked on CPU with a CPU GradScaler.

fp16 compute itself is CUDA-only (Precision refuses it on CPU); the scaler
decisions around it are device-independent, so these tests attach a CPU
GradScaler (make_scaler) to a float32 Precision and drive overflow by hand.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from megacpp.errors import MegacppError
from megacpp.recipe.policy import PrecisionSpec
from megacpp.train.precision import Precision, make_scaler

CPU = torch.device("cpu")
INIT, INTERVAL = 1024.0, 3


def scaled_precision(**kw) -> Precision:
    spec = PrecisionSpec(compute="fp32", loss_scale_init=INIT, loss_scale_growth_interval=INTERVAL, **kw)
    p = Precision(spec, CPU)
    p.scaler = make_scaler(spec, CPU)
    return p


def setup():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 1)
    opts = [torch.optim.AdamW(a.parameters(), lr=1e-2), torch.optim.SGD(b.parameters(), lr=1e-2)]
    return (a, b), opts


def params_of(mods):
    return [p.detach().clone() for m in mods for p in m.parameters()]


def one_step(p: Precision, mods, opts, overflow=False) -> tuple[bool, bool]:
    """(stepped, parameters changed)."""
    a, b = mods
    loss = b(torch.tanh(a(torch.randn(4, 8)))).pow(2).mean()
    if overflow:
        loss = loss * float("inf")
    before = params_of(mods)
    p.scale(loss).backward()
    p.unscale_(opts)
    stepped = p.step(opts)
    for o in opts:
        o.zero_grad(set_to_none=True)
    changed = any(not torch.equal(x, y) for x, y in zip(before, params_of(mods)))
    return stepped, changed


def test_overflow_skips_the_step_halves_the_scale_and_regrows():
    p = scaled_precision()
    mods, opts = setup()
    assert one_step(p, mods, opts) == (True, True)
    assert p.scaler.get_scale() == INIT
    # overflow: no optimizer moves a parameter, the scale halves
    assert one_step(p, mods, opts, overflow=True) == (False, False)
    assert p.scaler.get_scale() == INIT / 2
    assert all(int(st["step"]) == 1 for st in opts[0].state.values())  # AdamW counted one real step
    # growth after exactly INTERVAL clean steps, counted from the overflow
    for i in range(INTERVAL - 1):
        assert one_step(p, mods, opts) == (True, True)
        assert p.scaler.get_scale() == INIT / 2, i
    assert one_step(p, mods, opts) == (True, True)
    assert p.scaler.get_scale() == INIT


def test_caller_skipped_step_backs_off_and_restarts_the_count():
    # The trainer skips non-finite steps itself (after unscale_): skip_step must
    # leave the scaler as an overflow would, growth count restarted.
    p = scaled_precision()
    mods, opts = setup()
    for _ in range(INTERVAL - 1):
        one_step(p, mods, opts)
    a, b = mods
    p.scale(b(a(torch.randn(4, 8))).sum() * float("inf")).backward()
    p.unscale_(opts)
    p.skip_step()
    for o in opts:
        o.zero_grad(set_to_none=True)
    assert p.scaler.get_scale() == INIT / 2
    for _ in range(INTERVAL - 1):
        one_step(p, mods, opts)
    assert p.scaler.get_scale() == INIT / 2, "grew before INTERVAL clean steps after the skip"
    one_step(p, mods, opts)
    assert p.scaler.get_scale() == INIT
    # and the scaler accepts a full step right after a skip (its unscale records were cleared)
    assert one_step(p, mods, opts) == (True, True)


def test_scaler_state_round_trips():
    p = scaled_precision()
    mods, opts = setup()
    one_step(p, mods, opts, overflow=True)
    one_step(p, mods, opts)
    q = scaled_precision()
    q.load_state_dict(p.state_dict())
    assert q.scaler.get_scale() == INIT / 2
    assert q.scaler.state_dict()["_growth_tracker"] == 1
    d = p.describe()
    assert d["loss_scaling"] == "dynamic" and d["loss_scale"]["current"] == INIT / 2
    assert d["loss_scale"]["growth_interval"] == INTERVAL


def test_no_scaler_outside_fp16():
    p = Precision(PrecisionSpec(compute="bf16"), CPU)
    assert p.scaler is None and p.describe()["loss_scaling"] == "none"
    mods, opts = setup()
    assert one_step(p, mods, opts) == (True, True)
    p.skip_step()  # nothing to back off


def test_fp16_refused_on_cpu():
    with pytest.raises(MegacppError, match="policy.precision.compute: fp16 needs a CUDA device"):
        Precision(PrecisionSpec(compute="fp16"), CPU)


def test_params_bf16_needs_bf16_compute():
    for compute in ("fp32",):
        with pytest.raises(MegacppError, match="policy.precision.params=bf16 needs policy.precision.compute=bf16"):
            Precision(dataclasses.replace(PrecisionSpec(), compute=compute, params="bf16"), CPU)
