"""Triton SSD (ops/ssd/triton_ssd.py) against the pure-torch reference.

Every check runs y, final_state and the gradients of x, dt, A, B, C, D and
initial_state through both implementations on fresh random inputs and
compares them to the reference evaluated in float64 on the same (already
rounded) input values, so the error measured is the kernel's alone.

- CUDA tests (skipped without CUDA or triton): float32, bf16 and fp16 at
  model-like sizes (chunk 64/128, headdim 64, dstate 128), seqlen not a
  multiple of the chunk, ngroups > 1 and ngroups == nheads (Mamba-3), with
  and without D / initial_state, and document resets (dt A = -1e4).
- CPU: if triton imports, the same checks on tiny shapes under the Triton
  interpreter. TRITON_INTERPRET=1 is read when @triton.jit decorates the
  kernels, i.e. at import of triton_ssd, so those tests run in a child
  pytest started with it set (test_triton_interpreter.py).

Errors are measured per tensor as  norm = ||a - r|| / ||r||  and
max = max|a - r| / max|r|  (r: float64 reference).
"""
from __future__ import annotations

import importlib.util
import functools
import math
import os

import pytest
import torch

from megacpp.ops.ssd import ssd_backend, ssd_backend_reason, ssd_fast
from megacpp.ops.ssd.reference import ssd as ssd_ref
from ops_testutil import assert_errors_within
from ops_testutil import err_norm_max as _err

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("MEGACPP_SSD_INTERP_CHILD") == "1"

# Tolerances (norm, max), by the dtype of x/B/C.
# float32: the kernels accumulate in float32 and use IEEE float32 matmuls, so
#   the error is float32 rounding (eps 6e-8) grown by sums of ~chunk * dstate
#   terms; measured ~1e-7 (norm) on CPU. 1e-5 / 1e-4 leave 100x room while
#   still catching any wrong term (a missing or misplaced term is O(1)).
# fp16: operands of every matmul are rounded to fp16 (unit roundoff
#   u = 2^-11 = 4.9e-4), outputs and half gradients are stored in fp16;
#   measured ~4e-4 norm / 6e-4 max under the interpreter. 8u / 20u.
# bf16: the same with u = 2^-8 = 3.9e-3 (8x fp16): ~1 roundings of
#   operands plus the output's own rounding give ~u in norm; 5u / 13u.
TOL = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}
NAMES = ("x", "dt", "A", "B", "C", "D", "initial_state")


def make_inputs(b, l, h, p, g, n, *, dtype, device, with_d=True, with_init=True, resets=0.0, gen=None):
    """Model-like inputs: dt in [1e-3, 0.5] (log-uniform), A in [-16, -0.5];
    dt, A, D float32 as Mamba passes them, x/B/C/initial_state in `dtype`.
    `resets`: fraction of steps turned into document starts by rescaling
    the inputs (dt' A = -1e4, x' = x dt / dt'), the way the models did it
    before the op took `starts` (still a valid use of the op)."""
    kw = dict(device="cpu", generator=gen)
    x = torch.randn(b, l, h, p, **kw)
    dt = torch.exp(torch.empty(b, l, h).uniform_(math.log(1e-3), math.log(0.5), generator=gen))
    A = -torch.empty(h).uniform_(0.5, 16.0, generator=gen)
    B = torch.randn(b, l, g, n, **kw)
    C = torch.randn(b, l, g, n, **kw)
    D = torch.randn(h, **kw) if with_d else None
    s0 = torch.randn(b, h, p, n, **kw) if with_init else None
    if resets:
        starts = torch.rand(b, l, generator=gen) < resets
        dt_new = torch.where(starts[..., None], (-1e4 / A).expand_as(dt), dt)
        x = x * (dt / dt_new)[..., None]
        dt = dt_new
    half = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    f32 = lambda t: None if t is None else t.to(device=device)  # noqa: E731
    return [half(x), f32(dt), f32(A), half(B), half(C), f32(D), half(s0)]


def compare(fn, inputs, chunk, seed=0, starts=None):
    """Run fn and the float64 reference forward + backward (with the document
    `starts`, if given); return {name: (norm, max)}."""
    x = inputs[0]
    gen = torch.Generator().manual_seed(seed)
    b, l, h, p = x.shape
    n = inputs[3].shape[-1]
    gy = torch.randn(b, l, h, p, generator=gen).to(x.device)
    gs = torch.randn(b, h, p, n, generator=gen).to(x.device)
    ours = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    ref = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    kw = {} if starts is None else {"starts": starts.to(x.device)}
    y, s = fn(*ours[:5], chunk, D=ours[5], initial_state=ours[6], **kw)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert s.dtype == x.dtype and s.shape == (b, h, p, n)
    ((y.double() * gy.double()).sum() + (s.double() * gs.double()).sum()).backward()
    yr, sr = ssd_ref(*ref[:5], chunk, D=ref[5], initial_state=ref[6], **kw)
    # y's backward rounds the incoming gradient to y's dtype whoever computes
    # the op: hand the reference the same rounded values, so the error measured
    # is the kernel's own.
    gy_r, gs_r = gy.to(x.dtype).double(), gs.to(x.dtype).double()
    ((yr * gy_r).sum() + (sr * gs_r).sum()).backward()
    errs = {"y": _err(y, yr), "final_state": _err(s, sr)}
    for name, a, r in zip(NAMES, ours, ref):
        if a is not None:
            assert a.grad is not None and a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
            assert torch.isfinite(a.grad).all(), f"d{name} not finite"
            errs["d" + name] = _err(a.grad, r.grad)
    return errs


# dA sums every step's decay-weighted products (heavy cancellation). On an
# H200 (2026-11-27) the compiled kernels' float32 dA came out 1.9e-4 (norm) /
# 1.4e-4 (max) off the float64 reference in the resets and Mamba-3 (g = h)
# cases, against ~1e-7 under the interpreter; every other output stayed
# within 1e-5. Until that gap is traced, float32 dA gets its own bound.
DA_TOL_FP32 = (1e-3, 1e-3)
# On the GPU the float32 dA error is far wider, and only where decays reach
# -1e4 (document resets): benchmarks/ssd_fp32_seeds.py over 30 seeds on an
# H200 (2026-11-29, BENCHMARKS.md): the resets case median 4.6e-4, 90th
# percentile 1.8e-3, worst 7.2e-3 (max 8.9e-3); the Mamba-3 case (resets
# too) worst 8.9e-4; the ragged case without resets worst 7.3e-6, while
# every other output stayed within 1e-6. So DA_TOL_FP32 failed about one GPU
# seed in five: the CUDA tests take this bound, ~6x the worst seen, still
# far below the O(1) error of a wrong or missing term. Not the cause:
# Triton's approximate float32 exp (libdevice's expf gave the same errors).
# The cause (benchmarks/ssd_da_parts.py, seed 28): _dcb_kernel's intra-chunk
# d(a) was nonzero at reset steps on the GPU only (an FMA-fused cumsum(g) - g),
# now rounded once (_mul_rn). Until the seeds are re-run on a GPU with that
# fix (BENCHMARKS.md "Not yet measured"), the CUDA bound stays this wide.
DA_TOL_FP32_CUDA = (5e-2, 5e-2)
# The same cancellation under float16: a head's dA is one number, the net of
# many terms of both signs, so its relative error has a long tail where the
# net is small. The interpreter's f16 "starts" case over 60 seeds
# (2026-11-28): median 1.2e-4, 90th percentile 6.3e-4, worst 2.7e-3, and one
# CI seed (1632445521) 5.4e-3 while every other gradient stayed under 4.4e-4.
DA_TOL_FP16 = (2e-2, 2e-2)
# bfloat16, 8x coarser than float16, has the same tail 8x longer. The
# interpreter's bf16 case over 200 seeds (2026-11-29): median 1.1e-3, 90th
# percentile ~4.5e-3, 99th 1.6e-2, and CI seed 419811619 at 0.141 (norm 0.129)
# while every other gradient stayed within 1e-2. A wrong term or sign puts dA
# off by order 1, which this bound still catches. Only the interpreter's
# small bf16 case takes it (its_bf16_da=True), and so do the CUDA tests' bf16
# cases: on an H200 (2026-11-29, benchmarks/ssd_fp32_seeds.py --dtype
# bfloat16, 30 seeds a case) dA's worst was 1.3e-2 (norm) / 1.7e-2 (max) in
# the ragged case, two thirds of TOL's 2e-2 after 30 seeds, with the same
# cancelling sum behind it.
DA_TOL_BF16 = (0.25, 0.25)


def assert_close(errs, dtype, its_bf16_da=False, cuda=False):
    """errs within TOL; dA within its own bound (cuda: errs came from the GPU's kernels)."""
    da_tol = {torch.float16: DA_TOL_FP16, **({torch.bfloat16: DA_TOL_BF16} if its_bf16_da or cuda else {})}
    if dtype in da_tol and "dA" in errs:
        (norm, mx), (tn, tm) = errs["dA"], da_tol[dtype]
        assert norm <= tn and mx <= tm, f"{dtype} dA beyond ({tn}, {tm}): {errs['dA']}; all: {errs}"
        errs = {k: v for k, v in errs.items() if k != "dA"}
    assert_errors_within(errs, dtype, TOL, "dA", DA_TOL_FP32_CUDA if cuda else DA_TOL_FP32)


# ---------------------------------------------------------------- dispatch

def test_dispatch_cpu_uses_reference(gen, monkeypatch):
    monkeypatch.delenv("MEGACPP_SSD", raising=False)
    assert ssd_backend("cpu") == "reference"
    assert ssd_backend_reason("cpu")
    monkeypatch.setenv("MEGACPP_SSD", "reference")
    assert ssd_backend_reason("cuda") == "disabled by MEGACPP_SSD=reference"
    assert ssd_backend("cuda") == "reference"
    monkeypatch.setenv("MEGACPP_SSD", "triton")
    with pytest.raises(RuntimeError):
        ssd_backend("cpu")
    monkeypatch.setenv("MEGACPP_SSD", "bogus")
    with pytest.raises(ValueError):
        ssd_backend("cpu")
    monkeypatch.delenv("MEGACPP_SSD")
    ins = make_inputs(2, 9, 2, 3, 1, 4, dtype=torch.float32, device="cpu", gen=gen)
    y, s = ssd_fast(*ins[:5], 4, D=ins[5], initial_state=ins[6])
    yr, sr = ssd_ref(*ins[:5], 4, D=ins[5], initial_state=ins[6])
    assert torch.equal(y, yr) and torch.equal(s, sr)


# -------------------------------------------------------------------- CUDA

cuda_only = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")

# (b, l, h, p, g, n, chunk, with_d, with_init, resets)
CUDA_CASES = [
    pytest.param((2, 300, 4, 64, 1, 128, 128, True, True, 0.0), id="ragged-g1-D-init"),
    pytest.param((2, 256, 6, 32, 3, 64, 64, False, False, 0.0), id="exact-g3"),
    pytest.param((1, 200, 4, 64, 2, 128, 128, True, False, 0.03), id="resets-g2-D"),
    pytest.param((2, 100, 2, 16, 1, 16, 32, False, True, 0.0), id="short-init"),
    pytest.param((2, 256, 8, 64, 8, 128, 128, False, False, 0.02), id="mamba3-g=h"),
]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_matches_reference(case, dtype, seed, gen):
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    b, l, h, p, g, n, chunk, with_d, with_init, resets = case
    ins = make_inputs(b, l, h, p, g, n, dtype=dtype, device="cuda", with_d=with_d,
                      with_init=with_init, resets=resets, gen=gen)
    assert_close(compare(ssd_triton, ins, chunk, seed), dtype, cuda=True)


def doc_starts(b, l, frac, gen):
    starts = torch.rand(b, l, generator=gen) < frac
    starts[:, 0] = True
    return starts


# the op's own document starts (only the log-decay changes there), with D and an
# initial state; (b, l, h, p, g, n, chunk)
STARTS_CASES = [pytest.param((2, 300, 4, 64, 1, 128, 128), id="g1-ragged"),
                pytest.param((1, 256, 8, 64, 8, 128, 128), id="g=h")]


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", STARTS_CASES)
def test_cuda_starts_match_reference(case, dtype, seed, gen):
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    b, l, h, p, g, n, chunk = case
    ins = make_inputs(b, l, h, p, g, n, dtype=dtype, device="cuda", gen=gen)
    assert_close(compare(ssd_triton, ins, chunk, seed, starts=doc_starts(b, l, 0.03, gen)), dtype, cuda=True)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_keep_states_equals_recompute(dtype, seed, gen):
    keep_states_case("cuda", dtype, gen, seed)


@cuda_only
@pytest.mark.gpu
def test_cuda_fp16(seed, gen):
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    ins = make_inputs(2, 160, 4, 64, 2, 64, dtype=torch.float16, device="cuda", gen=gen)
    assert_close(compare(ssd_triton, ins, 64, seed), torch.float16)


@cuda_only
@pytest.mark.gpu
def test_cuda_dispatch_and_compile(seed, gen, monkeypatch):
    monkeypatch.delenv("MEGACPP_SSD", raising=False)
    assert ssd_backend("cuda", torch.bfloat16) == "triton", ssd_backend_reason("cuda", torch.bfloat16)
    assert ssd_backend("cuda", torch.float64) == "reference"
    ins = make_inputs(2, 200, 4, 64, 1, 128, dtype=torch.bfloat16, device="cuda", gen=gen)

    def f(x, dt, A, B, C, chunk, D=None, initial_state=None):
        y, s = ssd_fast(x, dt, A, B, C, chunk, D=D, initial_state=initial_state)
        return y * 1.0, s  # something around the op for inductor to fuse

    torch._dynamo.reset()
    assert_close(compare(torch.compile(f, fullgraph=True), ins, 128, seed), torch.bfloat16)


# ------------------------------------------------------- CPU interpreter

interp_only = pytest.mark.skipif(not (CHILD and HAS_TRITON), reason="runs in the TRITON_INTERPRET=1 child of "
                                 "test_triton_interpreter.py")

# (b, l, h, p, g, n, chunk, with_d, with_init, resets, dtype)
# The interpreter's time grows with batch * heads * chunks (one program each),
# so only the first case has batch 2 and 2 groups of 2 heads (batch and
# head/group indexing do not depend on the dtype; f16-g=h: 2 groups of 1, the
# others 1 group of 2-3); every case has 2 or 3 chunks with a ragged tail.
INTERP_CASES = [
    pytest.param((2, 21, 4, 8, 2, 16, 16, True, True, 0.0, torch.float32), id="f32-ragged-g2-D-init"),
    pytest.param((1, 40, 3, 8, 1, 16, 16, False, False, 0.1, torch.float32), id="f32-resets"),
    pytest.param((1, 50, 2, 16, 1, 32, 24, True, False, 0.0, torch.float32), id="f32-chunk24"),
    # (no resets in fp16: dx = dt' * (...) at a reset step exceeds fp16's range
    # whoever computes it; the reference's fp16 dx overflows too)
    pytest.param((1, 40, 2, 16, 2, 16, 16, False, True, 0.0, torch.float16), id="f16-g=h"),
    pytest.param((1, 40, 2, 16, 1, 32, 16, True, True, 0.0, torch.bfloat16), id="bf16"),
]


@interp_only
@pytest.mark.parametrize("case", INTERP_CASES)
def test_cpu_interp_matches_reference(case, seed, gen):
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    *shape, chunk, with_d, with_init, resets, dtype = case
    ins = make_inputs(*shape, dtype=dtype, device="cpu", with_d=with_d, with_init=with_init,
                      resets=resets, gen=gen)
    assert_close(compare(ssd_triton, ins, chunk, seed), dtype, its_bf16_da=True)


# (b, l, h, p, g, n, chunk, dtype): fp16 too, which the rescaled resets could not take
# (f32-g2: batch 2 for the starts' batch stride, 2 groups; 2 heads a group: INTERP_CASES)
STARTS_INTERP = [pytest.param((2, 37, 2, 8, 2, 16, 16, torch.float32), id="f32-g2"),
                 pytest.param((1, 40, 2, 16, 1, 32, 16, torch.float16), id="f16")]


@interp_only
@pytest.mark.parametrize("case", STARTS_INTERP)
def test_cpu_interp_starts_match_reference(case, seed, gen):
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    *shape, chunk, dtype = case
    ins = make_inputs(*shape, dtype=dtype, device="cpu", gen=gen)
    assert_close(compare(ssd_triton, ins, chunk, seed, starts=doc_starts(shape[0], shape[1], 0.1, gen)), dtype)


def _grads_of(fn, ins, chunk, starts, keep, gen_seed):
    gen = torch.Generator().manual_seed(gen_seed)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    y, s = fn(*leaves[:5], chunk, D=leaves[5], initial_state=leaves[6], starts=starts, keep_states=keep)
    gy = torch.randn(y.shape, generator=gen).to(device=y.device, dtype=y.dtype)
    gs = torch.randn(s.shape, generator=gen).to(device=s.device, dtype=s.dtype)
    ((y.float() * gy.float()).sum() + (s.float() * gs.float()).sum()).backward()
    return [y, s] + [t.grad for t in leaves if t is not None]


def keep_states_case(device, dtype, gen, seed):
    """keep_states=True (the forward's states, CB and cumsum kept for the
    backward) against recomputing them: the same kernels on the same inputs,
    so bitwise the same outputs and gradients."""
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    # CPU: batch 2, 2 chunks (ragged), 2 groups; one head a group is enough
    # here, both runs take the same kernels (the interpreter's time grows
    # with batch * heads * chunks)
    b, l, h = (2, 21, 2) if device == "cpu" else (2, 300, 4)
    ins = make_inputs(b, l, h, 16, 2, 32, dtype=dtype, device=device, gen=gen)
    starts = doc_starts(b, l, 0.2 if device == "cpu" else 0.1, gen).to(device)  # CPU: ~as many as at l = 37
    chunk = 16 if device == "cpu" else 128
    kept = _grads_of(ssd_triton, ins, chunk, starts, True, seed)
    recomputed = _grads_of(ssd_triton, ins, chunk, starts, False, seed)
    for a, r in zip(kept, recomputed):
        assert torch.equal(a, r)


@interp_only
def test_cpu_interp_keep_states_equals_recompute(seed, gen, monkeypatch):
    from megacpp.ops.ssd import triton_ssd as T
    calls = {"cb": 0, "states": 0}

    def counted(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(T, "_cb", counted("cb", T._cb))
    monkeypatch.setattr(T, "_states_fwd", counted("states", T._states_fwd))
    keep_states_case("cpu", torch.float32, gen, seed)
    # forward + backward: 1 + 0 kept, 1 + 1 recomputed
    assert calls == {"cb": 3, "states": 3}


@interp_only
def test_cpu_interp_custom_op_and_compile(seed, gen):
    # Fake (meta) implementations and autograd registration as torch.compile
    # sees them: opcheck, then a fullgraph aot_eager compile (inductor's CPU
    # backend would not change what is being tested here: the op is opaque).
    from megacpp.ops.ssd import triton_ssd as T
    ins = make_inputs(1, 20, 2, 16, 1, 16, dtype=torch.float32, device="cpu", gen=gen)
    starts = doc_starts(1, 20, 0.2, gen)
    # starts (None / given) and keep (off / on, kept given / [] to the backward)
    # each both ways, paired: the fakes branch on keep alone and read neither
    # starts nor kept, and each real path (starts or not, kept or not) runs in
    # one pairing; the other two add none (each opcheck runs the op twice)
    for st, keep in ((None, False), (starts, True)):
        torch.library.opcheck(T._ssd_fwd_op, (*ins, 16, st, keep), test_utils=("test_schema", "test_faketensor"))
        kept = list(T._ssd_fwd_op(*ins, 16, st, True)[2:]) if keep else []
        dy = torch.randn_like(ins[0])
        torch.library.opcheck(T._ssd_bwd_op, (dy, None, *ins[:5], None, None, 16, st, kept),
                              test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    f = torch.compile(T.ssd_triton, backend="aot_eager", fullgraph=True)
    assert_close(compare(f, ins, 16, seed), torch.float32)
    torch._dynamo.reset()
    g = torch.compile(functools.partial(T.ssd_triton, keep_states=True), backend="aot_eager", fullgraph=True)
    assert_close(compare(g, ins, 16, seed, starts=starts), torch.float32)


@interp_only
@pytest.mark.parametrize("half", [True, False], ids=["bf16-states", "f32-states"])
def test_cpu_interp_state_dtype(half, seed, gen, monkeypatch):
    """bf16 inputs keep bf16 chunk states (HALF_STATES), float32 ones float32;
    the fake kernel agrees with the real one; kept and recomputed states give
    bitwise the same outputs and gradients either way."""
    from megacpp.ops.ssd import triton_ssd as T
    monkeypatch.setattr(T, "HALF_STATES", half)
    ins = make_inputs(1, 20, 2, 16, 1, 16, dtype=torch.bfloat16, device="cpu", gen=gen)
    states = T._ssd_fwd_op(*ins, 16, None, True)[2]
    assert states.dtype == (torch.bfloat16 if half else torch.float32)
    f32 = make_inputs(1, 20, 2, 16, 1, 16, dtype=torch.float32, device="cpu", gen=gen)
    assert T._ssd_fwd_op(*f32, 16, None, True)[2].dtype == torch.float32
    torch.library.opcheck(T._ssd_fwd_op, (*ins, 16, None, True), test_utils=("test_schema", "test_faketensor"))
    keep_states_case("cpu", torch.bfloat16, gen, seed)


@interp_only
def test_cpu_interp_two_row_blocks_a_chunk_match_reference(seed, gen):
    """The kernels walk each chunk in row blocks (the default block is 64
    rows, so chunk 128 takes two; every other interpreter case has one): the
    state scans store a chunk's state at its first block and carry it at its
    last, _dx/_dbc/_scan_fwd add the off-diagonal blocks (a planted error
    dropping _dx_kernel's is caught here only).
    Three chunks, unpacked and with a slow decay, so every block reaches the
    carry and the initial state's gradient: with document starts every ~10
    steps, or make_inputs' decays down to A = -16, a wrong carry of the
    second block moved nothing (the rows 64 steps before a chunk's end add
    ~1e-17 of it)."""
    from megacpp.ops.ssd.triton_ssd import ssd_triton
    ins = make_inputs(1, 300, 1, 8, 1, 16, dtype=torch.float32, device="cpu", with_d=True, with_init=True,
                      gen=gen)
    ins[2] = torch.full_like(ins[2], -0.2)
    assert_close(compare(ssd_triton, ins, 128, seed), torch.float32)


def intra_da_at_resets(device, shape, chunk, gen):
    """The backward's intra-chunk d(a) (triton_ssd.PARTS["da_intra"], summed
    over row blocks) at the steps whose log-decay is a reset (dt A = -1e4).
    Every pair of steps spanning a reset has decay exp(-1e4) = 0, so each
    must be exactly 0: dA multiplies it by the reset's dt (~1e3). On an H200
    an FMA-fused cumsum(g) - g left 1e-9..3e-5 there (BENCHMARKS.md,
    twenty-second session)."""
    from megacpp.ops.ssd import triton_ssd as T
    b, l, h, p, g, n = shape
    ins = make_inputs(b, l, h, p, g, n, dtype=torch.float32, device=device, with_d=True, with_init=False,
                      resets=0.05, gen=gen)
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in ins]
    captured = {}
    T.PARTS = captured
    try:
        y, s = T.ssd_triton(*leaves[:5], chunk, D=leaves[5])
        (y.sum() + s.sum()).backward()
    finally:
        T.PARTS = None
    da = captured["da_intra"].sum(3).reshape(b, h, -1)
    reset = captured["dt"] * ins[2].view(1, h, 1) < -1e3
    assert reset.any(), "no reset step drawn"
    return da[reset]


@interp_only
def test_cpu_interp_intra_da_is_zero_at_resets(seed, gen):
    assert torch.count_nonzero(intra_da_at_resets("cpu", (1, 96, 2, 16, 1, 16), 32, gen)) == 0


@cuda_only
@pytest.mark.gpu
def test_cuda_intra_da_is_zero_at_resets(seed, gen):
    vals = intra_da_at_resets("cuda", (2, 300, 4, 64, 2, 128), 128, gen)
    assert torch.count_nonzero(vals) == 0, f"nonzero intra-chunk d(a) at resets: {vals[vals != 0][:8].tolist()}"


# this file's interpreter tests (the `cpu_interp` ones) and the variable that marks the
# child they run in: test_triton_interpreter.py runs every op's in one child process
INTERP_CHILD = ("MEGACPP_SSD_INTERP_CHILD", len(INTERP_CASES) + len(STARTS_INTERP) + 2 + 2 + 1 + 1)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(CHILD, reason="the parent process (INTERPRET unset)")
def test_launch_table_applies_tuned_to_half_operands_only(monkeypatch):
    """TUNED (swept in bf16) applies to half-precision operands only; float32
    (IEEE) launches keep the defaults; LAUNCH overrides both; a block size
    that must cover a whole dimension cannot be set."""
    from megacpp.ops.ssd import triton_ssd as T
    monkeypatch.setattr(T, "INTERPRET", False)
    monkeypatch.setitem(T.TUNED, "scan_fwd", {"BK": 16, "num_stages": 1})
    monkeypatch.setitem(T.LAUNCH, "scan_fwd", {})
    assert T._launch("scan_fwd", False, BM=64, BK=64, num_warps=4) == {"BM": 64, "BK": 16, "num_warps": 4,
                                                                       "num_stages": 1}
    assert T._launch("scan_fwd", True, BM=64, BK=64, num_warps=4) == {"BM": 64, "BK": 64, "num_warps": 4}
    monkeypatch.setitem(T.LAUNCH, "scan_fwd", {"BM": 32})
    assert T._launch("scan_fwd", True, BM=64, BK=64)["BM"] == 32
    monkeypatch.setitem(T.LAUNCH, "dx", {"BP": 32})
    with pytest.raises(ValueError, match="BP"):
        T._launch("dx", False, BJ=64, BP=64)
    monkeypatch.setattr(T, "INTERPRET", True)     # the interpreter: defaults only
    assert T._launch("scan_fwd", False, BM=64, BK=64) == {"BM": 64, "BK": 64}
