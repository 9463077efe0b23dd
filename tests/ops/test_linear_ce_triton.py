"""The Triton linear cross-entropy (ops/linear_ce/triton_linear_ce.py) against
the logits-materialising baseline: forward and both gradients, on fresh
random inputs. On the CPU its kernel runs under Triton's interpreter in a
child pytest (TRITON_INTERPRET=1 is read when the kernel module is imported);
on CUDA in bf16 and float32 (GPU-only tests)."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from megacpp.ops.linear_ce import linear_cross_entropy_naive
from ops_testutil import rel_err

HAS_TRITON = importlib.util.find_spec("triton") is not None
CHILD = os.environ.get("MEGACPP_LCE_INTERP_CHILD") == "1"
interp_only = pytest.mark.skipif(not (CHILD and HAS_TRITON), reason="runs in the TRITON_INTERPRET=1 child of "
                                 "test_triton_interpreter.py")
cuda_only = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs CUDA and triton")


def make(gen, n, d, v, device, dtype, ignore_frac=0.25):
    hidden = torch.randn(n, d, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=gen) * d ** -0.5).to(device, dtype).requires_grad_()
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < ignore_frac] = -100
    return hidden, weight, target.to(device)


def both(gen, hidden, weight, target, reduction, chunk_size):
    """(loss, d_hidden, d_weight) of the Triton op and of the float32/64 baseline."""
    from megacpp.ops.linear_ce.triton_linear_ce import linear_cross_entropy_triton
    go = torch.randn((), generator=gen).to(hidden.device) if reduction != "none" else \
        torch.randn(hidden.shape[0], generator=gen).to(hidden.device)
    outs = []
    for fn, cast in ((linear_cross_entropy_triton, None), (linear_cross_entropy_naive, torch.float64)):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        hh, ww = (h, w) if cast is None else (h.to(cast), w.to(cast))
        kw = {"chunk_size": chunk_size} if cast is None else {}
        loss = fn(hh, ww, target, reduction=reduction, **kw)
        gh, gw = torch.autograd.grad(loss, (h, w), go.to(loss.dtype))
        outs.append((loss.double(), gh.double(), gw.double()))
    return outs


CASES = [  # (n, d, vocab, chunk, reduction): vocab past one 4096 block, ragged chunks, one chunk
    (37, 8, 50, 16, "mean"),
    (37, 8, 50, 16, "sum"),
    (20, 4, 4100, 7, "mean"),
    (9, 16, 33, 64, "sum"),
    (12, 8, 40, 5, "none"),
]


@interp_only
@pytest.mark.parametrize("case", CASES)
def test_cpu_interp_matches_naive(case, gen):
    n, d, v, chunk, reduction = case
    hidden, weight, target = make(gen, n, d, v, "cpu", torch.float32)
    (l1, h1, w1), (l0, h0, w0) = both(gen, hidden, weight, target, reduction, chunk)
    for name, a, b in (("loss", l1, l0), ("d_hidden", h1, h0), ("d_weight", w1, w0)):
        assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))


@interp_only
def test_cpu_interp_all_ignored_and_custom_index(gen):
    from megacpp.ops.linear_ce.triton_linear_ce import linear_cross_entropy_triton
    hidden, weight, target = make(gen, 10, 4, 30, "cpu", torch.float32)
    # every token ignored: "mean" is NaN (as F.cross_entropy), gradients exactly zero
    loss = linear_cross_entropy_triton(hidden, weight, torch.full_like(target, -100), chunk_size=4)
    assert torch.isnan(loss)
    loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0
    # ignore_index other than -100: those tokens add nothing
    t = target.clamp(min=0)
    t[::2] = 7
    a = linear_cross_entropy_triton(hidden, weight, t, ignore_index=7, reduction="sum", chunk_size=3)
    b = linear_cross_entropy_naive(hidden.double(), weight.double(), t, ignore_index=7, reduction="sum")
    assert rel_err(a.double(), b) < 1e-5


@interp_only
def test_cpu_interp_no_grad_skips_the_gradient_gemms(gen, monkeypatch):
    """Under no_grad (evaluation) the loss is the same and no gradient GEMM runs."""
    from megacpp.ops.linear_ce import triton_linear_ce as T
    hidden, weight, target = make(gen, 30, 8, 50, "cpu", torch.float32)
    calls = []
    real = T._accumulate_dw
    monkeypatch.setattr(T, "_accumulate_dw", lambda *a: (calls.append(1), real(*a)))
    with torch.no_grad():
        a = T.linear_cross_entropy_triton(hidden, weight, target, chunk_size=8)
    assert calls == []
    b = T.linear_cross_entropy_triton(hidden, weight, target, chunk_size=8)
    assert len(calls) == 4 and torch.equal(a, b.detach())


# this file's interpreter tests (the `cpu_interp` ones) and the variable that marks the
# child they run in: test_triton_interpreter.py runs every op's in one child process
INTERP_CHILD = ("MEGACPP_LCE_INTERP_CHILD", len(CASES) + 2)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_bad_inputs_name_the_argument():
    from megacpp.ops.linear_ce.triton_linear_ce import linear_cross_entropy_triton
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy_triton(h, torch.randn(10, 7), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be int64"):
        linear_cross_entropy_triton(h, w, torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_triton(h, w, torch.zeros(4, dtype=torch.long), reduction="avg")


@cuda_only
@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cuda_bf16_matches_float64_baseline(reduction, gen):
    """bf16 operands at a head-sized shape, several chunks: within the patch's
    bf16 parity tolerance (logits rounded to bf16, as Liger's), and the
    d_weight accumulation path recorded."""
    from megacpp.ops.linear_ce import triton_linear_ce as T
    n, d, v = 3000, 256, 32768
    hidden, weight, target = make(gen, n, d, v, "cuda", torch.bfloat16)
    (l1, h1, w1), (l0, h0, w0) = both(gen, hidden, weight, target, reduction, 1024)
    errs = {"loss": rel_err(l1, l0), "d_hidden": rel_err(h1, h0), "d_weight": rel_err(w1, w0)}
    assert all(e < 2e-2 for e in errs.values()), errs
    assert T.DW_PATH in T._DW_PATHS


@cuda_only
@pytest.mark.gpu
def test_cuda_float32_weight_under_bf16_hidden(gen):
    """The model's case: bf16 hidden states, float32 head weight; d_weight
    comes back float32, accumulated in float32."""
    from megacpp.ops.linear_ce.triton_linear_ce import linear_cross_entropy_triton
    n, d, v = 2048, 128, 5000
    hidden, weight, target = make(gen, n, d, v, "cuda", torch.float32)
    h = hidden.detach().bfloat16().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss = linear_cross_entropy_triton(h, w, target, reduction="mean", chunk_size=512)
    loss.backward()
    assert w.grad.dtype == torch.float32 and h.grad.dtype == torch.bfloat16
    ref_h = h.detach().double().requires_grad_()
    ref_w = w.detach().double().requires_grad_()
    ref = linear_cross_entropy_naive(ref_h, ref_w, target, reduction="mean")
    ref.backward()
    assert rel_err(loss.double(), ref) < 2e-2
    assert rel_err(w.grad.double(), ref_w.grad) < 2e-2
    assert rel_err(h.grad.double(), ref_h.grad) < 2e-2


def test_patch_lists_triton_and_obeys_the_forcing_variable(monkeypatch):
    """The linear_ce patch offers the Triton op on CUDA only, and
    MEGACPP_LINEAR_CE forces one backend (the others marked why not)."""
    from megacpp.patches.linear_ce import LinearCEPatch
    p = LinearCEPatch()
    monkeypatch.delenv("MEGACPP_LINEAR_CE", raising=False)
    cpu = {b.name: b for b in p.backends(torch.device("cpu"))}
    assert list(cpu) == ["triton", "liger", "chunked"]
    assert not cpu["triton"].available and cpu["triton"].reason == "needs CUDA"
    assert p.best_backend(torch.device("cpu")).name == "chunked"
    monkeypatch.setenv("MEGACPP_LINEAR_CE", "triton")
    forced = {b.name: b for b in p.backends(torch.device("cpu"))}
    assert not forced["chunked"].available and forced["chunked"].reason == "MEGACPP_LINEAR_CE=triton"
    assert p.best_backend(torch.device("cpu")) is None  # triton cannot run on the CPU: nothing is
    monkeypatch.setenv("MEGACPP_LINEAR_CE", "fast")
    with pytest.raises(ValueError, match="MEGACPP_LINEAR_CE='fast'"):
        p.backends(torch.device("cpu"))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_operand_dtype_follows_autocast():
    """Under autocast the GEMMs take the autocast dtype even for float32 hidden
    states and weight (the trainer's case: without it the head ran as TF32)."""
    from megacpp.ops.linear_ce.triton_linear_ce import operand_dtype
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    assert operand_dtype(h, w) == torch.float32
    assert operand_dtype(h.bfloat16(), w) == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert operand_dtype(h, w) == torch.bfloat16


@cuda_only
@pytest.mark.gpu
def test_cuda_autocast_float32_inputs_take_bf16_gemms(gen):
    """float32 hidden and weight under bf16 autocast give exactly what bf16
    hidden with the float32 weight gives outside it (the same bf16 GEMMs)."""
    from megacpp.ops.linear_ce.triton_linear_ce import linear_cross_entropy_triton
    hidden, weight, target = make(gen, 1500, 128, 3000, "cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = linear_cross_entropy_triton(hidden, weight, target, reduction="sum", chunk_size=512)
    b = linear_cross_entropy_triton(hidden.detach().bfloat16(), weight, target, reduction="sum", chunk_size=512)
    assert torch.equal(a, b)


def test_a_backend_that_raises_fails_parity_not_the_run(monkeypatch):
    """install_patches falls back to the plain path when the backend's parity
    check raises (e.g. a Triton it cannot compile with)."""
    from megacpp.patches import linear_ce as L

    def broken(*a, **k):
        raise RuntimeError("triton: cannot compile\nmore")

    monkeypatch.setitem(L.BACKENDS, "chunked", broken)
    res = L.LinearCEPatch().parity(torch.device("cpu"), torch.float32, "chunked")
    assert not res.passed and res.detail == "RuntimeError: triton: cannot compile"


@cuda_only
@pytest.mark.gpu
def test_cuda_upstream_scale_is_applied_in_float32(gen):
    """The trainer scales the loss by lm_scale / accum: that factor reaches
    d_hidden in float32, not rounded to the GEMMs' bf16."""
    from megacpp.ops.linear_ce.triton_linear_ce import linear_cross_entropy_triton
    hidden, weight, target = make(gen, 600, 64, 1000, "cuda", torch.float32)
    grads = []
    for scale in (1.0, 1.0 / 3.0):
        h = hidden.detach().clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = linear_cross_entropy_triton(h, weight.detach(), target, reduction="sum", chunk_size=256)
        (loss * scale).backward()
        grads.append(h.grad)
    assert torch.equal(grads[1], grads[0] * (1.0 / 3.0))


def test_run_record_names_the_d_weight_path(monkeypatch):
    """run.json / the bench record how the Triton head accumulated d_weight,
    once it ran; nothing for another backend."""
    import sys
    import types

    from megacpp.train.trainer import linear_ce_dw_path
    model = types.SimpleNamespace(lm_loss_backend="chunked")
    assert linear_ce_dw_path(model) is None
    fake = types.ModuleType("megacpp.ops.linear_ce.triton_linear_ce")
    fake.DW_PATH = "addmm out_dtype"
    monkeypatch.setitem(sys.modules, "megacpp.ops.linear_ce.triton_linear_ce", fake)
    assert linear_ce_dw_path(model) is None
    model.lm_loss_backend = "triton"
    assert linear_ce_dw_path(model) == "addmm out_dtype"
