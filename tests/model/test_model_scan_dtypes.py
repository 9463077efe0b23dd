"""Under a bf16 recipe the scans get bf16 matmul operands.

The short causal convs in front of the Mamba and delta-rule scans used to
return float32 (bf16 activations times float32 conv weights), and the
Triton scans, being custom ops that autocast does not touch, then ran their
matmuls in float32 on CUDA cores: the nam-125m step spent 57% of its GPU
time in the SSD backward (H200 profile, BENCHMARKS.md). These tests pin
both halves of the fix: the conv returns its input's dtype, and the
dispatchers hand the kernels what autocast hands the reference's einsums.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from megacpp.model import mamba, recurrent
from megacpp.model.context import SeqContext, causal_conv1d, conv_step, conv_tail
from megacpp.ops._backend import autocast_operands
from megacpp.ops.delta_rule import dispatch as delta_dispatch
from megacpp.ops.delta_rule.reference import gated_delta_rule
from megacpp.ops.ssd import dispatch as ssd_dispatch
from megacpp.ops.ssd.reference import ssd as ssd_reference

from model_testutil import FAMILY_SPECS, build


def _conv_inputs(seed, b=2, t=24, c=12, K=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, c, generator=g).to(torch.bfloat16)
    w = torch.randn(c, 1, K, generator=g)
    bias = torch.randn(c, generator=g)
    doc_ids = (torch.rand(b, t, generator=g) < 0.2).long().cumsum(1)
    return x, w, bias, doc_ids


@pytest.mark.parametrize("packed", [False, True])
def test_causal_conv1d_returns_the_input_dtype_rounded_once(seed, packed):
    x, w, bias, doc_ids = _conv_inputs(seed)
    b, t, _ = x.shape
    ctx = SeqContext(b, t, "cpu", doc_ids if packed else None)
    y = causal_conv1d(x, w, bias, ctx)
    assert y.dtype == torch.bfloat16
    # the same taps on the float32 values, rounded once at the end
    want = causal_conv1d(x.float(), w, bias, ctx).to(torch.bfloat16)
    torch.testing.assert_close(y, want, rtol=0, atol=0)


def test_conv_step_returns_the_input_dtype_and_matches_the_full_conv(seed):
    x, w, bias, _ = _conv_inputs(seed)
    b, t, c = x.shape
    K = w.shape[-1]
    full = causal_conv1d(x, w, bias, SeqContext(b, t, "cpu"))
    state = conv_tail(x[:, :-1], K)
    y, _ = conv_step(x[:, -1], state, w, bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), full[:, -1].float(), rtol=1e-2, atol=1e-2)


def test_autocast_operands_casts_float32_only_under_autocast():
    a, h = torch.randn(3), torch.randn(3).to(torch.float16)
    assert autocast_operands("cpu", a, None, h) == (a, None, h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ca, none, ch = autocast_operands("cpu", a, None, h)
    assert ca.dtype == torch.bfloat16 and torch.equal(ca, a.to(torch.bfloat16))
    assert none is None and ch is h


def _record(seen, key, fn, names):
    def rec(*args, **kw):
        seen[key] = [args[i].dtype for i in names]
        return fn(*args, **kw)
    return rec


@pytest.mark.parametrize("family", ["mamba2", "mamba3"])
def test_mamba_layers_hand_the_scan_bf16_operands_under_autocast(family, monkeypatch):
    seen = {}
    monkeypatch.setattr(mamba, "ssd", _record(seen, "ssd", ssd_reference, (0, 3, 4)))  # x, B, C
    model = build(FAMILY_SPECS[family], torch.float32)
    ids = torch.randint(0, 97, (2, 20))
    doc_ids = torch.tensor([[0] * 9 + [1] * 11, [0] * 20])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, doc_ids=doc_ids)
    assert seen["ssd"] == [torch.bfloat16] * 3


def test_recurrent_layers_hand_the_rule_bf16_operands_under_autocast(monkeypatch):
    seen = {}
    monkeypatch.setattr(recurrent, "gated_delta_rule_fast",
                        _record(seen, "delta", lambda *a, keep_states=False, **k: gated_delta_rule(*a, **k), (0, 1, 2)))  # q, k, v
    model = build(FAMILY_SPECS["gated_deltanet"], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (2, 20)), doc_ids=torch.tensor([[0] * 9 + [1] * 11, [0] * 20]))
    assert seen["delta"] == [torch.bfloat16] * 3


def _stand_in(monkeypatch, module: str, entry: str, seen: dict, fn, names):
    fake = types.ModuleType(module)
    setattr(fake, entry, _record(seen, entry, fn, names))
    monkeypatch.setitem(sys.modules, module, fake)


def test_ssd_dispatcher_casts_the_kernel_operands_under_autocast(seed, monkeypatch):
    seen = {}
    _stand_in(monkeypatch, "megacpp.ops.ssd.triton_ssd", "ssd_triton", seen,
              lambda x, dt, A, B, C, chunk, **kw: ssd_reference(x, dt, A, B, C, chunk, **kw), (0, 1, 2, 3, 4))
    monkeypatch.setattr(ssd_dispatch, "ssd_backend", lambda device, dtype=None: "triton")
    g = torch.Generator().manual_seed(seed)
    b, t, h, p, n = 1, 16, 2, 4, 8
    x, B, C = (torch.randn(b, t, *s, generator=g) for s in ((h, p), (1, n), (1, n)))
    dt, A = torch.rand(b, t, h, generator=g) * 0.1, -torch.rand(h, generator=g)
    ssd_dispatch.ssd_fast(x, dt, A, B, C, 8)
    assert seen["ssd_triton"] == [torch.float32] * 5  # no autocast: nothing changes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ssd_dispatch.ssd_fast(x, dt, A, B, C, 8)
    # x, B, C as the reference's einsums would get them; dt and A (decay arithmetic) stay float32
    assert seen["ssd_triton"] == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]


def test_delta_rule_dispatcher_casts_the_kernel_operands_under_autocast(seed, monkeypatch):
    seen = {}
    _stand_in(monkeypatch, "megacpp.ops.delta_rule.triton_delta_rule", "gated_delta_rule_triton", seen,
              lambda *a, keep_states=False, **k: gated_delta_rule(*a, **k), (0, 1, 2, 3, 4))
    monkeypatch.setattr(delta_dispatch, "delta_rule_backend", lambda *a, **k: "triton")
    g = torch.Generator().manual_seed(seed)
    b, t, h, d = 1, 16, 2, 8
    q, k, v = (torch.nn.functional.normalize(torch.randn(b, t, h, d, generator=g), dim=-1) for _ in range(3))
    gate, beta = -torch.rand(b, t, h, generator=g) * 0.1, torch.rand(b, t, h, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta_dispatch.gated_delta_rule_fast(q, k, v, gate, beta, chunk_size=8)
    assert seen["gated_delta_rule_triton"] == [torch.bfloat16] * 3 + [torch.float32] * 2
    # the reference keeps float32 inputs: autocast reaches its einsums by itself
    monkeypatch.setattr(delta_dispatch, "delta_rule_backend", lambda *a, **k: "reference")
    ref_seen = {}
    monkeypatch.setattr(delta_dispatch, "gated_delta_rule_reference",
                        _record(ref_seen, "ref", gated_delta_rule, (0, 1, 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        delta_dispatch.gated_delta_rule_fast(q, k, v, gate, beta, chunk_size=8)
    assert ref_seen["ref"] == [torch.float32] * 3


@pytest.mark.parametrize("family,calls", [("mamba2", 1), ("gated_deltanet", 3)])
def test_layers_take_the_conv_dispatcher_with_the_silu_fused(family, calls, seed, monkeypatch):
    """On CUDA the M and R layers' convs go to the Triton op with the SiLU
    fused and the packed rows' doc ids; a stand-in kernel module records the
    calls and answers with the reference, so the model's output must not move."""
    from megacpp.ops.causal_conv import dispatch as conv_dispatch
    from megacpp.ops.causal_conv.reference import causal_conv1d as conv_reference

    model = build(FAMILY_SPECS[family], torch.float32)
    ids = torch.randint(0, 97, (2, 20))
    doc_ids = torch.tensor([[0] * 9 + [1] * 11, [0] * 20])
    want = model(ids, doc_ids=doc_ids).logits
    seen = []

    def fake(x, w, bias, docs, activation):
        seen.append((activation, docs is doc_ids))
        return conv_reference(x, w, bias, docs, activation)

    _stand_in(monkeypatch, "megacpp.ops.causal_conv.triton_conv", "causal_conv1d_triton", {}, fake, ())
    monkeypatch.setattr(conv_dispatch, "conv_backend", lambda device, dtype=None: "triton")
    got = model(ids, doc_ids=doc_ids).logits
    assert seen == [("silu", True)] * calls * len(model.layers)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
