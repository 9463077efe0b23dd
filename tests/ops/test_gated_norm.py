"""Gated RMSNorm (ops/gated_norm): the reference against an independent
per-group loop, and the Triton kernels against the reference, forward and
gradients (x, z, weight), on fresh random inputs.

The kernels are compared with the reference evaluated in float64 on the
same (already rounded) inputs, so the error measured is the kernel's own.
CUDA cases run on a GPU; on CPU the same checks run under the Triton
interpreter in a child pytest (TRITON_INTERPRET=1 is read when the kernels
are decorated).
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from megacpp.model.norm import GatedRMSNorm
from megacpp.ops.gated_norm import (gated_norm_backend, gated_norm_backend_reason, gated_rms_norm,
                                    gated_rms_norm_fast)
from ops_testutil import assert_errors_within, err_norm_max

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
CHILD = os.environ.get("MEGACPP_GNORM_INTERP_CHILD") == "1"

# (norm, max) relative to the float64 reference. float32: a sum over the
# group in float32, ~1e-7 measured. Half types: y, dx and dz are rounded to
# the type once (2^-11 fp16, 2^-8 bf16); d(weight) is a float32 sum.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.5e-2, 3e-2)}


def make(shape, dtype, device, gen, z_slice=True):
    """x, z (a column slice of a wider tensor when z_slice, as the in_proj output is;
    z_slice="heads": (b, t, heads, dv) cut from a wider (b, t, W) projection, as
    Gated DeltaNet's gate is since its projections run fused), weight."""
    d = shape[-1]
    x = torch.randn(shape, generator=gen).to(dtype)
    if z_slice == "heads":
        b, t, h, dv = shape
        wide = torch.randn(b, t, 3 * h * dv + 5, generator=gen).to(dtype)
        z = wide[..., 2:2 + h * dv].reshape(b, t, h, dv)
        assert not z.is_contiguous() and z.reshape(-1, h, dv).data_ptr() == z.data_ptr()
    elif z_slice:
        wide = torch.randn(*shape[:-1], 2 * d + 3, generator=gen).to(dtype)
        z = wide[..., 3:3 + d]
    else:
        z = torch.randn(shape, generator=gen).to(dtype)
    w = 1.0 + 0.3 * torch.randn(d, generator=gen)  # float32 parameters, as the model's
    return x.to(device), z.to(device), w.to(device)


def run(fn, x, z, w, dy, cast=None, **kw):
    leaves = [(t.detach().to(cast) if cast else t.detach().clone()).requires_grad_(True) for t in (x, z, w)]
    y = fn(*leaves, 1e-5, **kw)
    y.backward(dy.to(y.dtype))
    return {"y": y, "dx": leaves[0].grad, "dz": leaves[1].grad, "dw": leaves[2].grad}


def compare(fn, x, z, w, gen, **kw):
    dy = torch.randn(x.shape, generator=gen).to(x.dtype).to(x.device)
    got = run(fn, x, z, w, dy, **kw)
    ref = run(gated_rms_norm, x, z, w, dy, cast=torch.float64, **kw)
    assert got["y"].dtype == x.dtype and got["dz"].dtype == z.dtype and got["dw"].dtype == w.dtype
    return {k: err_norm_max(got[k], ref[k]) for k in ref}


def assert_within(errs, dtype):
    assert_errors_within(errs, dtype, TOL)


# ------------------------------------------------------------- reference

@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_reference_is_the_per_group_definition(norm_before_gate, seed, gen):
    b, t, groups, g = 2, 5, 3, 4 + int(torch.randint(0, 6, (1,), generator=gen))
    x, z, w = (v.double() for v in make((b, t, groups * g), torch.float64, "cpu", gen))
    got = gated_rms_norm(x, z, w, 1e-6, g, norm_before_gate)
    want = torch.empty_like(x)
    for k in range(groups):
        cols = slice(k * g, (k + 1) * g)
        s = x[..., cols] if norm_before_gate else x[..., cols] * F.silu(z[..., cols])
        n = s / torch.sqrt((s * s).sum(-1, keepdim=True) / g + 1e-6)
        want[..., cols] = n * w[cols] * (F.silu(z[..., cols]) if norm_before_gate else 1.0)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_reference_rejects_bad_arguments(gen):
    x, z, w = make((2, 3, 8), torch.float32, "cpu", gen)
    with pytest.raises(ValueError, match="z has shape"):
        gated_rms_norm(x, z[..., :4], w, 1e-5)
    with pytest.raises(ValueError, match="weight has shape"):
        gated_rms_norm(x, z, w[:4], 1e-5)
    with pytest.raises(ValueError, match="group_size 3 does not divide"):
        gated_rms_norm(x, z, w, 1e-5, 3)


def test_module_on_cpu_is_the_reference(gen):
    assert gated_norm_backend("cpu", torch.float32) == "reference"
    m = GatedRMSNorm(12, 1e-5, group_size=4, norm_before_gate=False)
    with torch.no_grad():
        m.weight.normal_(generator=gen)
    x, z, _ = make((2, 3, 12), torch.float32, "cpu", gen)
    assert torch.equal(m(x, z), gated_rms_norm(x, z, m.weight, 1e-5, 4, False))
    assert torch.equal(gated_rms_norm_fast(x, z, m.weight, 1e-5, 4), gated_rms_norm(x, z, m.weight, 1e-5, 4))


# --------------------------------------------------------------- kernels

# (shape, group_size, norm_before_gate): Mamba-2 (one group over all
# channels, not a power of two), Mamba-3 (per head of 64), Gated DeltaNet
# (per head, rows = tokens x heads), a ragged group; rows no multiple of a block
CASES = [
    pytest.param(((2, 67, 1536), None, False, True), id="mamba2-1group"),
    pytest.param(((2, 33, 384), 64, True, True), id="mamba3-heads"),
    pytest.param(((2, 45, 3, 128), None, True, "heads"), id="deltanet"),
    pytest.param(((3, 21, 200), 100, False, True), id="ragged-2groups"),
]
INTERP_CASES = [
    pytest.param(((2, 37, 96), 32, False, True, torch.float32), id="f32-groups"),
    pytest.param(((3, 5, 4, 24), None, True, True, torch.float32), id="f32-heads-gate-after"),
    pytest.param(((2, 7, 3, 16), None, True, "heads", torch.float32), id="f32-deltanet-gate-slice"),
    pytest.param(((2, 11, 100), 50, False, True, torch.float16), id="f16-ragged"),
    pytest.param(((1, 70, 64), None, True, False, torch.float16), id="f16-many-rows"),
]

cuda_only = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_cuda_matches_reference(case, dtype, seed, gen):
    from megacpp.ops.gated_norm.triton_gated_norm import gated_rms_norm_triton
    shape, g, nbg, zs = case
    x, z, w = make(shape, dtype, "cuda", gen, z_slice=zs)
    assert_within(compare(gated_rms_norm_triton, x, z, w, gen, group_size=g, norm_before_gate=nbg), dtype)


@cuda_only
@pytest.mark.gpu
def test_cuda_dispatch_and_compile(seed, gen, monkeypatch):
    monkeypatch.delenv("MEGACPP_GATED_NORM", raising=False)
    assert gated_norm_backend("cuda", torch.bfloat16, 128) == "triton"
    # wide groups: the compiled reference measured faster (dispatch.WIDE_GROUP), unless forced
    assert gated_norm_backend("cuda", torch.bfloat16, 1536) == "reference"
    assert "1536 channels > 512" in gated_norm_backend_reason("cuda", torch.bfloat16, 1536)
    assert gated_norm_backend_reason("cuda", torch.bfloat16, 32768) == "group of 32768 channels > 16384"
    monkeypatch.setenv("MEGACPP_GATED_NORM", "triton")
    assert gated_norm_backend("cuda", torch.bfloat16, 1536) == "triton"
    monkeypatch.delenv("MEGACPP_GATED_NORM")
    x, z, w = make((2, 100, 256), torch.bfloat16, "cuda", gen)
    torch._dynamo.reset()
    f = torch.compile(gated_rms_norm_fast, fullgraph=True)
    assert_within(compare(f, x, z, w, gen, group_size=128, norm_before_gate=False), torch.bfloat16)


interp_only = pytest.mark.skipif(not (CHILD and HAS_TRITON), reason="runs in the TRITON_INTERPRET=1 child of "
                                 "test_triton_interpreter.py")


@interp_only
@pytest.mark.parametrize("case", INTERP_CASES)
def test_cpu_interp_matches_reference(case, seed, gen):
    from megacpp.ops.gated_norm.triton_gated_norm import gated_rms_norm_triton
    shape, g, nbg, zs, dtype = case
    x, z, w = make(shape, dtype, "cpu", gen, z_slice=zs)
    assert_within(compare(gated_rms_norm_triton, x, z, w, gen, group_size=g, norm_before_gate=nbg), dtype)


@interp_only
def test_cpu_interp_custom_op_and_compile(seed, gen):
    from megacpp.ops.gated_norm import triton_gated_norm as T
    x, z, w = make((2, 9, 48), torch.float32, "cpu", gen)
    torch.library.opcheck(T._gnorm_fwd_op, (x, z, w, 1e-5, 16, False),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(T._gnorm_bwd_op, (torch.randn_like(x), x, z, w, 1e-5, 16, True),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    f = torch.compile(T.gated_rms_norm_triton, backend="aot_eager", fullgraph=True)
    assert_within(compare(f, x, z, w, gen, group_size=16, norm_before_gate=True), torch.float32)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_entry_refuses_float64_and_huge_groups(gen):
    from megacpp.ops.gated_norm.triton_gated_norm import gated_rms_norm_triton
    x, z, w = make((1, 2, 8), torch.float64, "cpu", gen)
    with pytest.raises(TypeError, match="float64 goes to the reference"):
        gated_rms_norm_triton(x, z, w, 1e-5)
    x, z, w = make((1, 1, 32768), torch.float32, "cpu", gen, z_slice=False)
    with pytest.raises(ValueError, match="group_size 32768 > 16384"):
        gated_rms_norm_triton(x, z, w, 1e-5)


# this file's interpreter tests (the `cpu_interp` ones) and the variable that marks the
# child they run in: test_triton_interpreter.py runs every op's in one child process
INTERP_CHILD = ("MEGACPP_GNORM_INTERP_CHILD", len(INTERP_CASES) + 1)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.skipif(CHILD, reason="this is the parent")
def test_bench_script_smoke_on_cpu(tmp_path):
    """benchmarks/gated_norm_bench.py's code paths (parity, the launch sweep,
    the JSON) on tiny shapes under the interpreter: the GPU session runs it blind."""
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "gn.json"
    r = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gated_norm_bench.py"), "--cpu-smoke",
                        "--sweep", "--json", str(out)], env=dict(os.environ, TRITON_INTERPRET="1"),
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["path"] for r in rows} >= {"compiled reference", "triton", "triton TILE 64 w4"}
    assert all(r["max_rel_err"] < 2e-2 for r in rows)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_row_views_need_no_copy_for_the_model_layouts(gen):
    """The layouts the model hands over are addressed in place: the in_proj slice
    (b, t, d) and Gated DeltaNet's gate, (b, t, heads, dv) cut from its fused
    projection; only a layout with non-unit channel stride is copied."""
    from megacpp.ops.gated_norm.triton_gated_norm import _inner, _rows
    _, z, _ = make((2, 5, 48), torch.float32, "cpu", gen)
    _, zh, _ = make((2, 5, 3, 16), torch.float32, "cpu", gen, z_slice="heads")
    for t in (z, zh):
        t3, s_o, s_i = _rows(t, _inner(t))
        assert t3.data_ptr() == t.data_ptr() and (s_o, s_i) == (t.stride(-3), t.stride(-2))
    cols = torch.randn(2, 5, 48).transpose(1, 2)                    # channels not contiguous
    assert _rows(cols, _inner(cols))[0].data_ptr() != cols.data_ptr()
