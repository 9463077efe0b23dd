"""Triton gated delta rule (ops/delta_rule/triton_delta_rule.py) against the pure-torch reference.

Every check runs o, final_state and the gradients of q, k, v, g, beta and
initial_state through both implementations on fresh random inputs and
compares them to the reference evaluated in float64 on the same (already
rounded) input values, so the error measured is the kernel's alone.

- CUDA tests (skipped without CUDA or triton): float32, bf16 and fp16 at
  model-like sizes (chunk 64, dk = dv = 128), seqlen not a multiple of the
  chunk, dk != dv, with and without initial_state, document resets
  (g = -1e4), and the dispatcher under torch.compile.
- CPU: if triton imports, the same checks on tiny shapes under the Triton
  interpreter. TRITON_INTERPRET=1 is read when @triton.jit decorates the
  kernels, i.e. at import of triton_delta_rule, so those tests run in a
  child pytest started with it set (test_triton_interpreter.py).
- CPU: every kernel launch of forward + backward at the nam-125m shape
  compiled for sm_90 (Hopper) as the JIT would specialise it, no GPU needed:
  catches compile errors and shared-memory overflows before a GPU session.

Errors are measured per tensor as  norm = ||a - r|| / ||r||  and
max = max|a - r| / max|r|  (r: float64 reference).
"""
from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from megacpp.ops.delta_rule import delta_rule_backend, delta_rule_backend_reason, gated_delta_rule_fast
from megacpp.ops.delta_rule.reference import gated_delta_rule as gdr_ref
from ops_testutil import assert_errors_within
from ops_testutil import err_norm_max as _err

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("MEGACPP_DELTA_RULE_INTERP_CHILD") == "1"
RESET = -1.0e4  # model.context.RESET_LOG_DECAY

# Tolerances (norm, max), by the dtype of q/k/v.
# float32: float32 accumulation, IEEE float32 matmuls, T solved in float32;
#   measured ~1e-7 (norm) under the interpreter. 1e-5 / 1e-4 leave 100x
#   room while still catching any wrong term (a missing term is O(1)).
# fp16: matmul operands rounded to fp16 (u = 4.9e-4), outputs and half
#   gradients stored in fp16; measured ~5e-4 norm / 7e-4 max. 8u / 20u.
# bf16: the same with u = 3.9e-3; under the interpreter the matmuls stay
#   float32 (see triton_delta_rule) and only the stored outputs round
#   (~3e-3). A float64 emulation of the GPU's bf16 operand rounding at
#   l = 2048, dk = dv = 128 gives ~4e-3 norm / 6e-3 max for o and the state.
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
# d(g) is a reverse within-chunk cumulative sum (float64) of float32 per-step
# terms that cancel pairwise (each pair (i, j) adds +x at i and -x at j), so
# float32 rounding of the terms shows up relative to the (smaller) result:
# measured up to 3e-6 norm with document resets. Its own float32 bound.
DG_TOL_FP32 = (1e-4, 1e-4)
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(b, l, h, dk, dv, *, dtype, device, with_init=True, resets=0.0, gate_dtype=torch.float32,
                strong_decay=False, gen=None):
    """Model-like inputs: L2-normalised q and k, v = silu(noise), g = -A dt with
    A in [1, 16] and dt log-uniform in [1e-3, 0.1] (or logsigmoid(noise) * 4 with
    `strong_decay`), beta = sigmoid(noise). q/k/v/initial_state in `dtype`, g and
    beta in `gate_dtype` (the model passes float32). `resets`: fraction of steps
    turned into document starts (g = -1e4, as model.context.reset_log_decay)."""
    kw = dict(generator=gen, dtype=torch.float64)
    q = F.normalize(torch.randn(b, l, h, dk, **kw), dim=-1)
    k = F.normalize(torch.randn(b, l, h, dk, **kw), dim=-1)
    v = F.silu(torch.randn(b, l, h, dv, **kw))
    if strong_decay:
        g = F.logsigmoid(torch.randn(b, l, h, **kw)) * 4
    else:
        A = torch.empty(h, dtype=torch.float64).uniform_(1.0, 16.0, generator=gen)
        dt = torch.exp(torch.empty(b, l, h, dtype=torch.float64).uniform_(math.log(1e-3), math.log(0.1),
                                                                         generator=gen))
        g = -A * dt
    beta = torch.sigmoid(torch.randn(b, l, h, **kw))
    s0 = torch.randn(b, h, dk, dv, **kw) if with_init else None
    if resets:
        starts = torch.rand(b, l, h, generator=gen, dtype=torch.float64) < resets
        g = torch.where(starts, torch.full_like(g, RESET), g)
    cast = lambda t, dt: None if t is None else t.to(device=device, dtype=dt)  # noqa: E731
    return [cast(q, dtype), cast(k, dtype), cast(v, dtype), cast(g, gate_dtype), cast(beta, gate_dtype),
            cast(s0, dtype)]


def compare(fn, inputs, chunk, seed=0, use_state=True):
    """Run fn and the float64 reference forward + backward; return {name: (norm, max)}."""
    q, v = inputs[0], inputs[2]
    gen = torch.Generator().manual_seed(seed)
    b, l, h, dk = q.shape
    dv = v.shape[-1]
    go = torch.randn(b, l, h, dv, generator=gen).to(q.device)
    gs = torch.randn(b, h, dk, dv, generator=gen).to(q.device)
    ours = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    ref = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    o, s = fn(*ours[:5], ours[5], chunk_size=chunk)
    assert o.dtype == q.dtype and o.shape == (b, l, h, dv)
    assert s.dtype == q.dtype and s.shape == (b, h, dk, dv)
    loss = (o.double() * go.double()).sum()
    if use_state:
        loss = loss + (s.double() * gs.double()).sum()
    loss.backward()
    o_r, s_r = gdr_ref(*ref[:5], ref[5], chunk_size=chunk)
    # o's backward rounds the incoming gradient to o's dtype whoever computes
    # the op: hand the reference the same rounded values.
    go_r, gs_r = go.to(q.dtype).double(), gs.to(q.dtype).double()
    loss_r = (o_r * go_r).sum()
    if use_state:
        loss_r = loss_r + (s_r * gs_r).sum()
    loss_r.backward()
    errs = {"o": _err(o, o_r), "final_state": _err(s, s_r)}
    for name, a, r in zip(NAMES, ours, ref):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
            assert torch.isfinite(a.grad).all(), f"d{name} not finite"
            errs["d" + name] = _err(a.grad, r.grad)
    return errs


def assert_close(errs, dtype):
    assert_errors_within(errs, dtype, TOL, "dg", DG_TOL_FP32, show=True)


# ---------------------------------------------------------------- dispatch

def test_dispatch_cpu_uses_reference(gen, monkeypatch):
    monkeypatch.delenv("MEGACPP_DELTA_RULE", raising=False)
    assert delta_rule_backend("cpu") == "reference"
    assert delta_rule_backend_reason("cpu")
    monkeypatch.setenv("MEGACPP_DELTA_RULE", "reference")
    assert delta_rule_backend_reason("cuda") == "disabled by MEGACPP_DELTA_RULE=reference"
    assert delta_rule_backend("cuda") == "reference"
    monkeypatch.setenv("MEGACPP_DELTA_RULE", "triton")
    with pytest.raises(RuntimeError):
        delta_rule_backend("cpu")
    monkeypatch.setenv("MEGACPP_DELTA_RULE", "bogus")
    with pytest.raises(ValueError):
        delta_rule_backend("cpu")
    monkeypatch.delenv("MEGACPP_DELTA_RULE")
    ins = make_inputs(2, 9, 2, 3, 4, dtype=torch.float32, device="cpu", gen=gen)
    o, s = gated_delta_rule_fast(*ins[:5], ins[5], chunk_size=4)
    o_r, s_r = gdr_ref(*ins[:5], ins[5], chunk_size=4)
    assert torch.equal(o, o_r) and torch.equal(s, s_r)


@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="the limits are checked after the CUDA check")
@pytest.mark.gpu
def test_dispatch_limits(monkeypatch):
    monkeypatch.delenv("MEGACPP_DELTA_RULE", raising=False)
    assert "chunk_size" in delta_rule_backend_reason("cuda", torch.bfloat16, chunk_size=256)
    assert "dk" in delta_rule_backend_reason("cuda", torch.bfloat16, dk=512)
    assert delta_rule_backend("cuda", torch.float64) == "reference"


def test_kernels_module_is_imported_lazily():
    # importing megacpp must never need triton: the kernels module (which
    # imports triton) loads only when a CUDA tensor or an attribute asks for it
    code = ("import sys, megacpp.ops.delta_rule as d; d.delta_rule_backend('cpu'); "
            "assert 'megacpp.ops.delta_rule.triton_delta_rule' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


# -------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")

# (b, l, h, dk, dv, chunk, with_init, resets, strong_decay)
CUDA_CASES = [
    pytest.param((2, 300, 4, 128, 128, 64, True, 0.0, False), id="ragged-init"),
    pytest.param((2, 256, 3, 128, 128, 64, False, 0.0, True), id="exact-strong-decay"),
    pytest.param((1, 200, 4, 128, 128, 64, False, 0.02, False), id="resets"),
    pytest.param((2, 100, 2, 64, 32, 32, True, 0.0, False), id="short-dk!=dv-chunk32"),
    pytest.param((1, 150, 2, 96, 80, 48, True, 0.01, True), id="odd-sizes-chunk48"),
]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_matches_reference(case, dtype, seed, gen):
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    b, l, h, dk, dv, chunk, with_init, resets, strong = case
    ins = make_inputs(b, l, h, dk, dv, dtype=dtype, device="cuda", with_init=with_init, resets=resets,
                      strong_decay=strong, gen=gen)
    assert_close(compare(gated_delta_rule_triton, ins, chunk, seed), dtype)


@cuda_only
@pytest.mark.gpu
def test_cuda_fp16_and_half_gates(seed, gen):
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    ins = make_inputs(2, 160, 4, 128, 128, dtype=torch.float16, device="cuda", gen=gen)
    assert_close(compare(gated_delta_rule_triton, ins, 64, seed), torch.float16)
    ins = make_inputs(2, 160, 4, 128, 128, dtype=torch.bfloat16, device="cuda", gate_dtype=torch.bfloat16,
                      with_init=False, gen=gen)
    assert_close(compare(gated_delta_rule_triton, ins, 64, seed, use_state=False), torch.bfloat16)


@cuda_only
@pytest.mark.gpu
def test_cuda_dispatch_and_compile(seed, gen, monkeypatch):
    monkeypatch.delenv("MEGACPP_DELTA_RULE", raising=False)
    assert delta_rule_backend("cuda", torch.bfloat16) == "triton", delta_rule_backend_reason("cuda", torch.bfloat16)
    assert delta_rule_backend("cuda", torch.float64) == "reference"
    ins = make_inputs(2, 200, 4, 128, 128, dtype=torch.bfloat16, device="cuda", with_init=False, resets=0.01,
                      gen=gen)

    def f(q, k, v, g, beta, initial_state=None, chunk_size=64):
        o, s = gated_delta_rule_fast(q, k, v, g, beta, initial_state, chunk_size=chunk_size)
        return o * 1.0, s  # something around the op for inductor to fuse

    torch._dynamo.reset()
    assert_close(compare(torch.compile(f, fullgraph=True), ins, 64, seed), torch.bfloat16)


@cuda_only
@pytest.mark.gpu
def test_cuda_kept_intermediates_give_the_same_gradients(seed, gen):
    """policy.kernels.delta_states = "keep" on the GPU: bf16 at a model-like
    shape, every output and gradient bit-identical to the recomputing path's."""
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    ins = make_inputs(2, 300, 4, 128, 128, dtype=torch.bfloat16, device="cuda", with_init=False, resets=0.01,
                      gen=gen)
    go = torch.randn(2, 300, 4, 128, device="cuda").bfloat16()
    runs = []
    for keep in (False, True):
        xs = [t.detach().clone().requires_grad_() if t is not None else None for t in ins]
        o, s = gated_delta_rule_triton(*xs[:5], None, chunk_size=64, keep_states=keep)
        (o.float() * go.float()).sum().backward()
        runs.append([o.detach(), s.detach()] + [x.grad for x in xs[:5]])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------- CPU interpreter

interp_only = pytest.mark.skipif(not (CHILD and HAS_TRITON), reason="runs in the TRITON_INTERPRET=1 child of "
                                 "test_triton_interpreter.py")

# (b, l, h, dk, dv, chunk, with_init, resets, strong_decay, use_state, dtype, gate_dtype)
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# The interpreter's time grows with batch * heads * chunks (one program each),
# so only f32-ragged-init has batch 2 and 2 heads together, f16 2 heads (batch
# and head indexing do not depend on the dtype); every case but the short one
# has 2+ chunks with a ragged tail (f32-resets and f32-chunk24: 3). Reset
# fractions keep the expected number of resets of the larger shapes (8 a case).
INTERP_CASES = [
    pytest.param((2, 21, 2, 16, 16, 16, True, 0.0, True, True, F32, F32), id="f32-ragged-init"),
    pytest.param((1, 40, 1, 16, 32, 16, False, 0.2, False, True, F32, F32), id="f32-resets"),
    pytest.param((1, 50, 1, 24, 40, 24, True, 0.0, True, False, F32, F32), id="f32-chunk24-dk!=dv-no-dfinal"),
    pytest.param((2, 13, 1, 80, 16, 16, False, 0.0, True, True, F32, F32), id="f32-short-dk80"),
    pytest.param((1, 24, 2, 32, 16, 16, True, 0.17, True, True, F16, F32), id="f16"),
    pytest.param((1, 24, 1, 32, 16, 16, True, 0.0, True, True, BF16, F32), id="bf16-model-gates"),
    pytest.param((1, 24, 1, 16, 16, 16, False, 0.0, True, True, BF16, BF16), id="bf16-half-gates"),
]


@interp_only
@pytest.mark.parametrize("case", INTERP_CASES)
def test_cpu_interp_matches_reference(case, seed, gen):
    from megacpp.ops.delta_rule.triton_delta_rule import gated_delta_rule_triton
    b, l, h, dk, dv, chunk, with_init, resets, strong, use_state, dtype, gdt = case
    ins = make_inputs(b, l, h, dk, dv, dtype=dtype, device="cpu", with_init=with_init, resets=resets,
                      strong_decay=strong, gate_dtype=gdt, gen=gen)
    assert_close(compare(gated_delta_rule_triton, ins, chunk, seed, use_state=use_state), dtype)


@interp_only
def test_cpu_interp_custom_op_and_compile(seed, gen):
    # Fake (meta) implementations and autograd registration as torch.compile
    # sees them: opcheck, then a fullgraph aot_eager compile (inductor's CPU
    # backend would not change what is being tested here: the op is opaque).
    from megacpp.ops.delta_rule import triton_delta_rule as T
    ins = make_inputs(1, 20, 2, 16, 16, dtype=torch.float32, device="cpu", gen=gen)
    for keep in (False, True):
        torch.library.opcheck(T._gdr_fwd_op, (*ins, 16, 0.25, keep), test_utils=("test_schema", "test_faketensor"))
    do = torch.randn(1, 20, 2, 16)
    torch.library.opcheck(T._gdr_bwd_op, (do, None, *ins[:5], None, 16, 0.25, []),
                          test_utils=("test_schema", "test_faketensor"))
    kept = list(T._gdr_fwd_op(*ins[:5], None, 16, 0.25, True)[2:])
    torch.library.opcheck(T._gdr_bwd_op, (do, None, *ins[:5], None, 16, 0.25, kept),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    f = torch.compile(T.gated_delta_rule_triton, backend="aot_eager", fullgraph=True)
    assert_close(compare(f, ins, 16, seed), torch.float32)


@interp_only
def test_cpu_interp_kept_intermediates_give_the_same_gradients(seed, gen):
    """keep_states: the backward takes T, Wk, the states and W from the forward
    (the same kernels on the same inputs): every gradient bit-identical to the
    recomputing backward's, also through a fullgraph compile."""
    from megacpp.ops.delta_rule import triton_delta_rule as T
    # 2 chunks (ragged) and 2 heads: both runs take the same kernels on the same
    # inputs (the interpreter's time grows with batch * heads * chunks); resets
    # as many as at (2, 45, 2) with 0.05
    b, l, h, dk, dv = 1, 21, 2, 16, 24
    ins = make_inputs(b, l, h, dk, dv, dtype=torch.float32, device="cpu", resets=0.2, gen=gen)
    go = torch.randn(b, l, h, dv, generator=gen)
    gs = torch.randn(b, h, dk, dv, generator=gen)
    runs = []
    torch._dynamo.reset()
    compiled = torch.compile(T.gated_delta_rule_triton, backend="aot_eager", fullgraph=True)
    for fn, keep in ((T.gated_delta_rule_triton, False), (T.gated_delta_rule_triton, True), (compiled, True)):
        xs = [t.detach().clone().requires_grad_() for t in ins]
        o, s = fn(*xs[:5], xs[5], chunk_size=16, keep_states=keep)
        ((o * go).sum() + (s * gs).sum()).backward()
        runs.append([o.detach(), s.detach()] + [x.grad for x in xs])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# T = (I + A)^-1 as _wy_fwd_kernel stores it, both solves, against a float64
# inverse: chunks of 1, 2, 4 blocks of 16 and ragged ones (the last blocks
# partly or wholly past the chunk), with document resets (zero decays)
SOLVE_CHUNKS = [16, 24, 48, 64]


@interp_only
@pytest.mark.parametrize("solve", ["blocks", "rows"])
def test_cpu_interp_wy_solve(solve, seed, gen, monkeypatch):
    from megacpp.ops.delta_rule import triton_delta_rule as T
    monkeypatch.setattr(T, "SOLVE", solve)
    for chunk in SOLVE_CHUNKS:
        # one head (the solve is per (batch, head) program); resets as many as with 2 heads at 0.05
        q, k, v, g, beta, _ = make_inputs(1, 2 * chunk - 5, 1, 32, 16, dtype=torch.float32, device="cpu",
                                          with_init=False, resets=0.1, strong_decay=True, gen=gen)
        p = T._Prep(q, k, v, g, beta, chunk, None)
        got, _, _ = T._wy_fwd(p, k, v, store_t=True)               # (b*h, nc, C, C)
        kk = k.double().permute(0, 2, 1, 3).reshape(p.b * p.h, p.l, k.shape[-1])
        kpad = torch.zeros(p.b * p.h, p.lp, k.shape[-1], dtype=torch.float64)
        kpad[:, :p.l] = kk
        kc = kpad.view(p.b * p.h, p.nc, chunk, -1)
        gam = p.gam.view(p.b * p.h, p.nc, chunk)
        bet = p.beta.double().view(p.b * p.h, p.nc, chunk)
        strict = torch.ones(chunk, chunk, dtype=torch.bool).tril(-1)
        decay = torch.exp((gam[..., :, None] - gam[..., None, :]).masked_fill(~strict, float("-inf")))
        A = bet[..., :, None] * (kc @ kc.transpose(-1, -2)) * decay
        want = torch.linalg.inv(torch.eye(chunk, dtype=torch.float64) + A)
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < 1e-6, f"solve={solve} chunk={chunk}: T off by {err:.2e} (relative norm)"


def test_solve_choice_is_checked(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from megacpp.ops.delta_rule import triton_delta_rule as T
    monkeypatch.setattr(T, "SOLVE", "sideways")
    with pytest.raises(ValueError, match="'blocks' or 'rows'"):
        T._solve_blocks_on()


def test_launch_overrides(monkeypatch):
    """_cfg: the defaults, then TUNED (half-precision operands only), then LAUNCH
    (a sweep's variant); tiles capped by the head dims; unknown options refused;
    nothing overridden under the interpreter."""
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from types import SimpleNamespace

    from megacpp.ops.delta_rule import triton_delta_rule as T
    assert set(T.KERNELS) == {k[1:-len("_kernel")] for k in T._CONFIG}
    half = SimpleNamespace(ieee=False, dk=128, dv=128)
    f32 = SimpleNamespace(ieee=True, dk=128, dv=128)
    monkeypatch.setattr(T, "INTERPRET", False)
    monkeypatch.setitem(T.TUNED, "dqk", {"BV": 64, "num_warps": 4})
    bk, bv, nw, ns = T._CONFIG["_dqk_kernel"][0]
    assert T._cfg("_dqk_kernel", half) == dict(BK=bk, BV=64, num_warps=4, num_stages=ns)
    assert T._cfg("_dqk_kernel", f32)["BV"] == T._CONFIG["_dqk_kernel"][1][1]  # TUNED is bf16's
    monkeypatch.setitem(T.LAUNCH, "dqk", {"BV": 256, "num_stages": 1})
    cfg = T._cfg("_dqk_kernel", half)
    assert (cfg["BV"], cfg["num_warps"], cfg["num_stages"]) == (128, 4, 1)  # capped at dv
    monkeypatch.setitem(T.LAUNCH, "state_fwd", {"BK": 64})  # the scans hold all of dk
    with pytest.raises(ValueError, match="state_fwd has no launch option"):
        T._cfg("_state_fwd_kernel", half)
    monkeypatch.setattr(T, "INTERPRET", True)
    assert T._cfg("_dqk_kernel", half)["BV"] == bv


# this file's interpreter tests (the `cpu_interp` ones) and the variable that marks the
# child they run in: test_triton_interpreter.py runs every op's in one child process
INTERP_CHILD = ("MEGACPP_DELTA_RULE_INTERP_CHILD", len(INTERP_CASES) + 1 + 2 + 1)


# ------------------------------------------- sm_90 compile, no GPU needed

H100_SHARED = 232448  # bytes of shared memory one block may use on sm_90


def _sm90_compile_all(dtype, monkeypatch, shape=(16, 2048, 6, 128, 128, 64)):
    """Compile every launch of forward + backward for sm_90 the way the JIT
    specialises it (ints == 1 constant, 16-divisible ints and pointers marked),
    using meta tensors for the host code. Returns [(kernel, shared bytes)]."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler.compiler import ASTSource

    from megacpp.ops.delta_rule import triton_delta_rule as T
    launches = []
    monkeypatch.setattr(T, "_launch", lambda kernel, grid, *args, **kw: launches.append((kernel, args, kw)))
    b, l, h, dk, dv, chunk = shape
    q = torch.empty(b, l, h, dk, device="meta", dtype=dtype)
    v = torch.empty(b, l, h, dv, device="meta", dtype=dtype)
    g = torch.empty(b, l, h, device="meta")
    T._forward(q, q, v, g, g, None, chunk, None)
    T._backward(torch.empty_like(v), None, q, q, v, g, g, None, chunk, None)
    out, seen = [], set()
    for kernel, args, kw in launches:
        key = (kernel.fn.__name__, tuple(sorted(kw.items(), key=str)))
        if key in seen:
            continue
        seen.add(key)
        sig, cons, attrs, it = {}, {}, {}, iter(args)
        for idx, (name, p) in enumerate(zip(kernel.arg_names, kernel.params)):
            if p.is_constexpr:
                sig[name], cons[name] = "constexpr", kw[name]
                continue
            ty, spec = native_specialize_impl(BaseBackend, next(it), False, True, True)
            if ty == "constexpr":
                sig[name], cons[name] = "constexpr", spec
            else:
                sig[name] = ty
                if spec == "D":
                    attrs[(idx,)] = [["tt.divisibility", 16]]
        opts = {k: kw[k] for k in ("num_warps", "num_stages") if k in kw}
        compiled = triton.compile(ASTSource(kernel, sig, cons, attrs), target=GPUTarget("cuda", 90, 32),
                                  options=opts)
        out.append((kernel.fn.__name__, compiled.metadata.shared))
    return out


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(CHILD, reason="needs compiled (not interpreted) kernels")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_kernels_compile_for_sm90(dtype, monkeypatch):
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # a triton build without the NVIDIA backend
        pytest.skip(f"no NVIDIA backend in triton: {e}")
    res = _sm90_compile_all(dtype, monkeypatch)
    assert len({k for k, _ in res}) == 7, res
    big = [(k, s) for k, s in res if s > H100_SHARED]
    assert not big, f"shared memory over the sm_90 limit: {big}"
