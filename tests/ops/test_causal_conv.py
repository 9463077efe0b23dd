"""Causal conv (ops/causal_conv): the reference's definition, and the Triton
kernels against it, forward and gradients (x, weight, bias), on fresh random
inputs.

The Triton kernels are compared with the reference evaluated in float64 on
the same (already rounded) inputs, so the error measured is the kernel's
own; in float32 the reference itself is compared too. CUDA cases run on a
GPU; on CPU the same checks run under the Triton interpreter in a child
pytest (TRITON_INTERPRET=1 is read when the kernels are decorated).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from megacpp.ops.causal_conv import causal_conv1d, causal_conv1d_fast, conv_backend, same_doc_mask
from ops_testutil import assert_errors_within, err_norm_max

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("MEGACPP_CONV_INTERP_CHILD") == "1"

# (norm, max) relative to the float64 reference. float32: sums of K float32
# products, ~1e-7 measured. Half types: the output (and the pre-activation,
# and its gradient) are rounded to the type, u = 2^-11 (fp16) / 2^-8 (bf16);
# dx rounds each tap's share in the reference but the sum once here.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (3e-3, 8e-3), torch.bfloat16: (2e-2, 5e-2)}


def random_docs(b, t, gen, mean=6):
    starts = torch.rand(b, t, generator=gen) < 1.0 / mean
    starts[:, 0] = True
    return (starts.long().cumsum(1) - 1).int()


def make(b, t, c, K, *, dtype, device, bias=True, docs=True, gen=None):
    x = torch.randn(b, t, c, generator=gen).to(dtype)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32  # float32 parameters, as the model's
    w = (torch.randn(c, 1, K, generator=gen) * 0.5).to(wdt)
    bb = (torch.randn(c, generator=gen) * 0.1).to(wdt) if bias else None
    doc = random_docs(b, t, gen) if docs else None
    mv = (lambda v: v.to(device) if v is not None else None)
    return mv(x), mv(w), mv(bb), mv(doc)


def run(fn, x, w, bias, doc, act, dy, dtype=None):
    """y and the gradients of x, weight, bias through fn (inputs cast to dtype if given)."""
    cast = (lambda v: v.detach().to(dtype) if dtype is not None and v is not None else
            (v.detach() if v is not None else None))
    xs, ws, bs = cast(x), cast(w), cast(bias)
    leaves = [v.requires_grad_(True) for v in (xs, ws, bs) if v is not None]
    y = fn(xs, ws, bs, doc, act)
    y.backward(dy.to(y.dtype))
    return {"y": y, "dx": xs.grad, "dw": ws.grad, **({"db": bs.grad} if bs is not None else {})}, leaves


def compare(fn, x, w, bias, doc, act, gen):
    dy = torch.randn(x.shape, generator=gen).to(x.device)
    got, _ = run(fn, x, w, bias, doc, act, dy.to(x.dtype))
    ref, _ = run(causal_conv1d, x, w, bias, doc, act, dy.to(x.dtype).double(), dtype=torch.float64)
    return {k: err_norm_max(got[k], ref[k]) for k in ref}


def assert_within(errs, dtype):
    assert_errors_within(errs, dtype, TOL)


# ------------------------------------------------------------- reference

@pytest.mark.parametrize("act", [None, "silu"])
def test_reference_packed_equals_each_document_alone(act, seed, gen):
    x, w, bias, doc = make(2, 40, 6, 4, dtype=torch.float64, device="cpu", gen=gen)
    y = causal_conv1d(x, w, bias, doc, act)
    for r in range(2):
        ids = doc[r]
        for d in ids.unique():
            sel = (ids == d).nonzero().flatten()
            alone = causal_conv1d(x[r:r + 1, sel], w, bias, None, act)
            torch.testing.assert_close(y[r:r + 1, sel], alone, rtol=1e-12, atol=1e-12)


def test_reference_silu_is_silu_of_the_rounded_conv(seed, gen):
    x, w, bias, doc = make(2, 30, 5, 3, dtype=torch.bfloat16, device="cpu", gen=gen)
    plain = causal_conv1d(x, w, bias, doc)
    assert plain.dtype == torch.bfloat16
    assert torch.equal(causal_conv1d(x, w, bias, doc, "silu"), F.silu(plain))
    # a memo of the masks changes nothing
    assert torch.equal(causal_conv1d(x, w, bias, doc, same_doc=lambda k: same_doc_mask(doc, k)), plain)


def test_reference_rejects_bad_arguments(gen):
    x, w, bias, doc = make(1, 8, 4, 3, dtype=torch.float32, device="cpu", gen=gen)
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:2], bias, doc)
    with pytest.raises(ValueError, match="doc_ids"):
        causal_conv1d(x, w, bias, doc[:, :4])
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, bias, doc, "gelu")


def test_dispatch_on_cpu_is_the_reference(gen):
    assert conv_backend("cpu", torch.float32) == "reference"
    x, w, bias, doc = make(1, 12, 4, 4, dtype=torch.float32, device="cpu", gen=gen)
    assert torch.equal(causal_conv1d_fast(x, w, bias, doc, "silu"), causal_conv1d(x, w, bias, doc, "silu"))


# --------------------------------------------------------------- kernels

# (b, t, c, K, bias, docs, act): ragged t and c (not multiples of the 64 x 128 tile)
CASES = [
    pytest.param((2, 150, 200, 4, True, True, "silu"), id="mamba-like"),
    pytest.param((2, 70, 130, 4, False, True, "silu"), id="deltanet-like"),
    pytest.param((1, 65, 40, 4, True, False, None), id="unpacked-noact"),
    pytest.param((2, 33, 17, 2, True, True, None), id="K2"),
]
# Under the interpreter the walks cost one step per row of every (row block,
# channel block, batch) program, so batch 2 is in f16-packed-silu alone (the
# same flags as f32-packed-silu, both paths); f32-packed-silu has 2+ row and
# channel blocks of every kernel (tiles: 64 x 128; walks: 32 x 128 forward,
# 8 x 64 backward), f16-packed-silu 2+ row blocks of the walks; all ragged.
INTERP_CASES = [
    pytest.param((1, 70, 130, 4, True, True, "silu", torch.float32), id="f32-packed-silu"),
    pytest.param((1, 40, 20, 3, False, False, None, torch.float32), id="f32-plain"),
    pytest.param((2, 37, 24, 4, True, True, "silu", torch.float16), id="f16-packed-silu"),
]

cuda_only = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
# the kernel paths: the walks (K <= 4, the default), the tiles (any K), and
# the one-pass tiles of the backward ("fused", its forward the walk)
PATHS = ["walk", "tiles", "fused"]


@contextlib.contextmanager
def conv_path(p, launch=None):
    """Run the conv's forward and backward on kernel path p ('walk' | 'tiles' |
    'fused': the walk forward, the one-pass backward), the walks with `launch`
    (small blocks reach the block edges in few rows)."""
    from megacpp.ops.causal_conv import triton_conv as T
    old_path, old_launch = dict(T.PATH), {k: dict(v) for k, v in T.LAUNCH.items()}
    T.PATH.update(fwd="walk" if p == "fused" else p, bwd=p)
    for k in ("fwd_walk", "bwd_walk"):
        T.LAUNCH[k] = dict(launch or {})
    try:
        yield T
    finally:
        T.PATH.update(old_path)
        T.LAUNCH.update(old_launch)


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_reference(case, dtype, path, seed, gen):
    b, t, c, K, bias, docs, act = case
    x, w, bb, doc = make(b, t, c, K, dtype=dtype, device="cuda", bias=bias, docs=docs, gen=gen)
    with conv_path(path) as T:
        assert T.path("bwd", K) == path
        assert_within(compare(T.causal_conv1d_triton, x, w, bb, doc, act, gen), dtype)


@cuda_only
@pytest.mark.gpu
def test_cuda_dispatch_and_compile(seed, gen, monkeypatch):
    monkeypatch.delenv("MEGACPP_CONV", raising=False)
    assert conv_backend("cuda", torch.bfloat16) == "triton"
    x, w, bb, doc = make(2, 100, 96, 4, dtype=torch.bfloat16, device="cuda", gen=gen)

    def f(x, w, bias, doc, act):
        return causal_conv1d_fast(x, w, bias, doc, act)

    torch._dynamo.reset()
    assert_within(compare(torch.compile(f, fullgraph=True), x, w, bb, doc, "silu", gen), torch.bfloat16)


interp_only = pytest.mark.skipif(not (CHILD and HAS_TRITON), reason="runs in the TRITON_INTERPRET=1 child of "
                                 "test_triton_interpreter.py")


@interp_only
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", INTERP_CASES)
def test_cpu_interp_matches_reference(case, path, seed, gen):
    b, t, c, K, bias, docs, act, dtype = case
    x, w, bb, doc = make(b, t, c, K, dtype=dtype, device="cpu", bias=bias, docs=docs, gen=gen)
    with conv_path(path) as T:
        assert_within(compare(T.causal_conv1d_triton, x, w, bb, doc, act, gen), dtype)


# every width the walks take, with blocks of 16 rows x 16 channels (the
# backward walk starts K-1 rows above its block: those rows cross programs)
WALK_WIDTHS = [pytest.param(K, bias, act, id=f"K{K}-{'bias' if bias else 'nobias'}-{act}")
               for K, bias, act in [(1, True, "silu"), (2, False, None), (3, True, None), (4, False, "silu")]]


@interp_only
@pytest.mark.parametrize("K,bias,act", WALK_WIDTHS)
def test_cpu_interp_walk_every_width(K, bias, act, seed, gen):
    # 2 x 2 blocks, both ragged: the backward walk of the first row block
    # crosses into the second (batch 2: test_cpu_interp_matches_reference)
    x, w, bb, doc = make(1, 21, 20, K, dtype=torch.float32, device="cpu", bias=bias, gen=gen)
    with conv_path("walk", {"BT": 16, "BC": 16}) as T:
        assert T.path("fwd", K) == T.path("bwd", K) == "walk"
        assert_within(compare(T.causal_conv1d_triton, x, w, bb, doc, act, gen), torch.float32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_path_choice():
    from megacpp.ops.causal_conv import triton_conv as T
    assert T.path("bwd", 4) == "walk" and T.path("bwd", 5) == "tiles"  # no walk past 4 taps
    with conv_path("tiles"):
        assert T.path("fwd", 2) == "tiles"
    with conv_path("sideways"), pytest.raises(ValueError, match="'walk' or 'tiles'"):
        T.path("fwd", 2)


@interp_only
def test_cpu_interp_custom_op_and_compile(seed, gen):
    from megacpp.ops.causal_conv import triton_conv as T
    # one row: the fakes and the registration do not depend on the batch (the
    # values at batch 2: test_cpu_interp_matches_reference), the walks' cost does
    x, w, bb, doc = make(1, 20, 12, 4, dtype=torch.float32, device="cpu", gen=gen)
    torch.library.opcheck(T._conv_fwd_op, (x, w, bb, doc, True), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(T._conv_bwd_op, (torch.randn_like(x), x, w, bb, doc, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    f = torch.compile(T.causal_conv1d_triton, backend="aot_eager", fullgraph=True)
    assert_within(compare(f, x, w, bb, doc, "silu", gen), torch.float32)


# the first backward pass stepping through its BT rows RT at a time (a launch
# the sweep may pick), and with and without a bias; t is no multiple of BT
DPRE_ROWS = [pytest.param({"BT": 32, "RT": 8, "BC": 16}, True, id="BT32-RT8-bias"),
             pytest.param({"BT": 64, "RT": 16, "BC": 32}, False, id="BT64-RT16-nobias")]


def _dpre_rows_case(launch, bias, dtype, device, gen):
    from megacpp.ops.causal_conv import triton_conv as T
    # one row on CPU (the interpreter runs every program in turn): the row
    # steps are within a program; batch 2 on the tiles: test_cpu_interp_matches_reference
    x, w, bb, doc = make(1 if device == "cpu" else 2, 70, 40, 4, dtype=dtype, device=device, bias=bias, gen=gen)
    old = dict(T.LAUNCH["dpre"])
    T.LAUNCH["dpre"] = dict(launch)
    try:
        with conv_path("tiles"):
            return compare(T.causal_conv1d_triton, x, w, bb, doc, "silu", gen)
    finally:
        T.LAUNCH["dpre"] = old


@interp_only
@pytest.mark.parametrize("launch,bias", DPRE_ROWS)
def test_cpu_interp_dpre_row_steps(launch, bias, seed, gen):
    assert_within(_dpre_rows_case(launch, bias, torch.float32, "cpu", gen), torch.float32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_dpre_rows_must_divide_its_block():
    from megacpp.ops.causal_conv import triton_conv as T
    old = dict(T.LAUNCH["dpre"])
    T.LAUNCH["dpre"] = {"BT": 32, "RT": 12}
    try:
        with pytest.raises(ValueError, match="RT=12 must divide BT=32"):
            T._launch("dpre", 1, 64, 16)
    finally:
        T.LAUNCH["dpre"] = old
    assert T._launch("dpre", 1, 64, 16)[0]["RT"] == T._launch("dpre", 1, 64, 16)[0]["BT"]  # one pass by default


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("launch,bias", DPRE_ROWS)
def test_cuda_dpre_row_steps(launch, bias, dtype, seed, gen):
    assert_within(_dpre_rows_case(launch, bias, dtype, "cuda", gen), dtype)


# this file's interpreter tests (the `cpu_interp` ones) and the variable that marks the
# child they run in: test_triton_interpreter.py runs every op's in one child process
INTERP_CHILD = ("MEGACPP_CONV_INTERP_CHILD", len(INTERP_CASES) * len(PATHS) + len(WALK_WIDTHS) + 1 + len(DPRE_ROWS))
