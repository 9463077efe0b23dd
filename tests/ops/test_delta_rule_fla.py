"""flash-linear-attention's gated delta rule (ops/delta_rule/fla_adapter.py): fla's
own version guard, the dispatcher's choice among fla / the project's Triton
kernels / the reference, and the adapter's argument mapping.

fla's kernels need CUDA, so the mapping is checked on CPU through a stand-in
`fla.ops.gated_delta_rule` module whose `chunk_gated_delta_rule` takes fla's
documented signature and layout ([B, T, H, K] q/k, [B, T, H, V] v, [B, T, H]
g and beta, [N, H, K, V] states, natural-log g, post-sigmoid beta, default
scale K^-0.5) and computes with a step-by-step recurrence. An adapter that
transposed a tensor, dropped the initial state or the scale would disagree
with the chunked reference on these fresh random inputs.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch

from megacpp.ops.delta_rule import dispatch
from megacpp.ops.delta_rule.fla_adapter import FLA_CHUNK, fla_guard, gated_delta_rule_fla
from megacpp.ops.delta_rule.reference import gated_delta_rule


@pytest.mark.parametrize("cap, triton, refused", [
    ((9, 0), "3.6.0", True),    # the lent H100/H200s: fla's guard refuses
    ((9, 0), "3.4.0", True),
    ((9, 0), "3.7.1", False),
    ((9, 0), "3.3.1", False),
    ((8, 0), "3.6.0", False),   # not Hopper: the guard does not apply
    ((10, 0), "3.6.0", False),
])
def test_fla_guard_is_fla_own_rule(cap, triton, refused):
    why = fla_guard(cap, triton, "0.6.0")
    assert bool(why) == refused
    if refused:
        assert "Hopper" in why and triton in why


def test_fla_guard_without_cuda_or_triton():
    assert fla_guard(None, "3.6.0") == "fla kernels need CUDA"
    assert fla_guard((9, 0), None) == "triton missing"


@pytest.mark.parametrize("env, chunk, fla_why, want", [
    (None, 64, "", "fla"),
    ("auto", None, "", "fla"),
    ("triton", 64, "", "triton"),             # MEGACPP_DELTA_RULE=triton: the project's kernels
    (None, 32, "", "triton"),                 # fla runs chunks of 64 only
    (None, 64, "fla 0.6.0 refuses", "triton"),
    ("reference", 64, "", "reference"),
])
def test_backend_choice_among_fla_triton_reference(monkeypatch, env, chunk, fla_why, want):
    """The dispatcher's own functions, with the device facts stood in: a CUDA
    device where the project's kernels would run, and fla's refusal as given."""
    if env is None:
        monkeypatch.delenv("MEGACPP_DELTA_RULE", raising=False)
    else:
        monkeypatch.setenv("MEGACPP_DELTA_RULE", env)
    kernels_ok = env != "reference"
    monkeypatch.setattr(dispatch, "delta_rule_backend_reason",
                        lambda *a, **k: "" if kernels_ok else "disabled by MEGACPP_DELTA_RULE=reference")
    monkeypatch.setattr(dispatch.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "fla_refusal_on", lambda index: fla_why)
    assert dispatch.delta_rule_backend(torch.device("cuda", 0), torch.bfloat16, chunk, 128) == want
    if want == "triton":
        assert dispatch.fla_reason(torch.device("cuda", 0), chunk)  # says why not fla


def test_cpu_never_takes_fla(monkeypatch):
    monkeypatch.delenv("MEGACPP_DELTA_RULE", raising=False)
    assert dispatch.fla_reason("cpu") == "fla kernels need CUDA"
    if not torch.cuda.is_available():
        assert dispatch.delta_rule_backend("cpu", torch.float32, 64, 16) == "reference"


def _fla_standin(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, **unused):
    """fla's chunk_gated_delta_rule contract, computed one step at a time in float64."""
    assert not unused, f"adapter passed arguments fla's call does not take here: {sorted(unused)}"
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = (torch.zeros(B, H, K, V, dtype=torch.float64) if initial_state is None
         else initial_state.double().clone())
    o = torch.empty(B, T, H, V, dtype=torch.float64)
    for t in range(T):
        kt, vt = k[:, t].double(), v[:, t].double()                    # (B, H, K), (B, H, V)
        a = torch.exp(g[:, t].double())[..., None, None]               # (B, H, 1, 1)
        b = beta[:, t].double()[..., None, None]
        S = a * S
        S = S + b * kt[..., :, None] * (vt[..., None, :] - (kt[..., None, :] @ S))
        o[:, t] = (q[:, t].double() * scale)[..., None, :].matmul(S).squeeze(-2)
    return o.to(q.dtype), (S.float() if output_final_state else None)


@pytest.fixture
def fake_fla(monkeypatch):
    fla = types.ModuleType("fla")
    ops = types.ModuleType("fla.ops")
    gdr = types.ModuleType("fla.ops.gated_delta_rule")
    gdr.chunk_gated_delta_rule = _fla_standin
    fla.ops, ops.gated_delta_rule = ops, gdr
    for name, mod in (("fla", fla), ("fla.ops", ops), ("fla.ops.gated_delta_rule", gdr)):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("with_init, scale", [(False, None), (True, None), (True, 0.3)])
def test_adapter_maps_arguments_like_the_reference(fake_fla, with_init, scale):
    g = torch.Generator().manual_seed(7 + with_init)
    B, T, H, K, V = 2, 70, 3, 8, 6
    q = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    gl = -torch.rand(B, T, H, generator=g) * 0.5
    gl[0, 33] = -1.0e4  # a document start: nothing carries across
    beta = torch.rand(B, T, H, generator=g)
    s0 = torch.randn(B, H, K, V, generator=g) if with_init else None
    o, s = gated_delta_rule_fla(q, k, v, gl, beta, s0, chunk_size=FLA_CHUNK, scale=scale)
    o_ref, s_ref = gated_delta_rule(q.double(), k.double(), v.double(), gl.double(), beta.double(),
                                    None if s0 is None else s0.double(), scale=scale)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-4, atol=1e-5)
    assert o.dtype == q.dtype and s.dtype == q.dtype


def test_adapter_refuses_other_chunks(fake_fla):
    x = torch.zeros(1, 4, 1, 16)
    with pytest.raises(ValueError, match="chunks of 64"):
        gated_delta_rule_fla(x, x, x, x[..., 0], x[..., 0], chunk_size=32)
