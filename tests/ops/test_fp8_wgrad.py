"""The experts' weight gradient in FP8 (ops.fp8_grouped.wgrad) against references
written here: the padded layout checked row by row, the per-group per-column
quantization through test_fp8_grouped's frexp `qdq`, the product in float64.
CPU: the emulated GEMM; CUDA: torch._scaled_grouped_mm's 2d x 2d case."""
from __future__ import annotations

import functools

import pytest
import torch

from megacpp.ops.fp8_grouped.wgrad import (ALIGN, fp8_grouped_wgrad, padded_layout,
                                          quantize_groups_transposed)
from test_fp8_grouped import CUDA, FP8_WHY, qdq


def _counts(E: int, with_empty: bool) -> torch.Tensor:
    c = torch.randint(1, 40, (E,))
    if with_empty:
        c[torch.randint(0, E, (2,))] = 0
    return c


def _reference(x, g, counts):
    """dW[e] = qdq(x_e)^T qdq(g_e), per-column scales within each group, float64."""
    out, start = [], 0
    for c in counts.tolist():
        xe, ge = x[start:start + c], g[start:start + c]
        if c:
            out.append(qdq(xe, 0).t() @ qdq(ge, 0))
        else:
            out.append(torch.zeros(x.shape[1], g.shape[1], dtype=torch.float64))
        start += c
    return torch.stack(out)


@pytest.mark.parametrize("with_empty", [False, True])
def test_padded_layout_puts_each_group_on_a_16_row_boundary(seed, with_empty):
    E = 6
    counts = _counts(E, with_empty)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    A = int(counts.sum())
    lay = padded_layout(offs, A, E)
    expert, pos, pends, cap = lay.expert, lay.pos, lay.ends, lay.capacity
    assert pends.dtype == torch.int32 and cap % ALIGN == 0 and int(pends[-1]) <= cap
    assert torch.all(pends % ALIGN == 0)
    assert len(set(pos.tolist())) == A and int(pos.max()) < int(pends[-1])
    assert lay.src.shape == (cap,) and torch.equal(lay.src[pos], torch.arange(A))
    assert int((lay.src >= 0).sum()) == A                                          # gaps and tail: -1
    assert lay.blocks.shape == (E + 1,) and int(lay.blocks.sum()) * ALIGN == cap
    assert torch.equal(torch.cumsum(lay.blocks[:E], 0) * ALIGN, pends.long())
    start, pstart = 0, 0
    for e, c in enumerate(counts.tolist()):
        assert torch.all(expert[start:start + c] == e)
        assert pos[start:start + c].tolist() == list(range(pstart, pstart + c))   # in order, from the boundary
        pstart = int(pends[e])
        start += c


def test_group_column_quantization_matches_frexp_reference(seed):
    E, C = 5, 24
    counts = _counts(E, True)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    A = int(counts.sum())
    t = torch.randn(A, C) * torch.logspace(-3, 3, C)           # columns of very different sizes
    lay = padded_layout(offs, A, E)
    expert, pos, cap = lay.expert, lay.pos, lay.capacity
    q, s = quantize_groups_transposed(t, lay, E)
    assert q.shape == (C, cap) and q.dtype == torch.float8_e4m3fn and s.shape == (E * C,)
    deq = q.float()[:, pos].t() * s.view(E, C)[expert]
    start = 0
    for c in counts.tolist():
        if c:
            torch.testing.assert_close(deq[start:start + c].double(), qdq(t[start:start + c], 0), rtol=0, atol=0)
        start += c
    keep = torch.zeros(cap, dtype=torch.bool)
    keep[pos] = True
    assert not q.view(torch.uint8)[:, ~keep].any()                # the gaps are zero


@pytest.mark.parametrize("with_empty", [False, True])
def test_emulated_fp8_wgrad_equals_reference(seed, with_empty):
    E, K, N = 6, 32, 48
    counts = _counts(E, with_empty)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    A = int(counts.sum())
    x, g = torch.randn(A, K), torch.randn(A, N) * 1e-3
    dw = fp8_grouped_wgrad(x, g, offs, E, emulate=True)
    want = _reference(x, g, counts)
    assert dw.shape == (E, K, N) and dw.dtype == torch.float32
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-9)
    exact = torch.zeros(E, K, N, dtype=torch.float64)
    start = 0
    for e, c in enumerate(counts.tolist()):
        exact[e] = x[start:start + c].double().t() @ g[start:start + c].double()
        start += c
    rel = (dw.double() - exact).norm() / exact.norm()
    assert 0 < rel < 0.05                                          # e4m3's rounding, not more
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert not dw[e].any()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA or FP8_WHY is not None, reason=str(FP8_WHY))
@pytest.mark.parametrize("with_empty", [False, True])
def test_fp8_wgrad_kernel_equals_emulation_on_cuda(seed, with_empty):
    """torch._scaled_grouped_mm (2d x 2d, padded groups) against the emulated GEMM
    on the same bytes, bf16 as in a run; empty experts are zero."""
    dev = torch.device("cuda")
    E, K, N = 8, 768, 1536
    counts = _counts(E, with_empty) * 37
    offs = torch.cumsum(counts, 0).to(torch.int32).to(dev)
    A = int(counts.sum())
    x = torch.randn(A, K, device=dev).bfloat16()
    g = (torch.randn(A, N, device=dev) * 1e-2).bfloat16()
    got = fp8_grouped_wgrad(x, g, offs, E)
    want = fp8_grouped_wgrad(x, g, offs, E, emulate=True)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert rel < 5e-3, rel
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert not got[e].any()


def _grouped_operands(seed: int, E: int, A: int, K: int, N: int, empty: int):
    """(counts, x, w, g) in bf16 for an E-expert grouped GEMM, expert `empty` without rows."""
    from test_fp8_grouped import random_groups
    gen = torch.Generator().manual_seed(seed)
    counts = random_groups(gen, E, A, empty=empty)
    x = torch.randn(A, K, generator=gen).to(torch.bfloat16)
    w = (torch.randn(E, K, N, generator=gen) * 0.05).to(torch.bfloat16)
    g = torch.randn(A, N, generator=gen).to(torch.bfloat16)
    return counts, x, w, g


def test_fp8_grouped_mm_with_fp8_wgrad_changes_only_the_weight_gradient(seed):
    """FP8GroupedMM(fp8_wgrad=True), emulated: output and input gradient bit-equal
    to the bf16-wgrad path; the weight gradient equals the FP8 wgrad of (x, g),
    within e4m3's rounding of the exact one, and not equal to it."""
    from functools import partial

    from megacpp.ops.fp8_grouped import fp8_grouped_mm_reference
    from test_fp8_grouped import run

    E = 5
    counts, x, w, g = _grouped_operands(seed, E, 200, 64, 48, empty=2)
    y0, dx0, dw0 = run(fp8_grouped_mm_reference, x, w, counts, g)
    y1, dx1, dw1 = run(partial(fp8_grouped_mm_reference, fp8_wgrad=True), x, w, counts, g)
    assert torch.equal(y0, y1) and torch.equal(dx0, dx1)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    assert torch.equal(dw1, fp8_grouped_wgrad(x, g, offs, E, emulate=True))
    assert dw1.dtype == torch.bfloat16 and not dw1[2].any()
    rel = ((dw1.double() - dw0.double()).norm() / dw0.double().norm()).item()
    assert 1e-2 < rel < 6e-2, rel                                  # e4m3 on both operands


def test_moe_with_fp8_wgrad_experts_tracks_bf16(seed):
    """The E layer with "fp8_rowwise_wgrad:emulate": the same output and input
    gradient as "fp8_rowwise:emulate", expert weight gradients near bf16's."""
    import megacpp
    from megacpp.model.moe import MoE

    r = megacpp.load_recipe("nam-tiny")
    ref = MoE(r.model).to(torch.bfloat16)
    ref.init_weights(0.05, 0.05)
    x = torch.randn(2, 24, r.model.hidden_size).to(torch.bfloat16)
    outs = {}
    for mode in ("none", "fp8_rowwise:emulate", "fp8_rowwise_wgrad:emulate"):
        m = MoE(r.model).to(torch.bfloat16)
        m.load_state_dict(ref.state_dict())
        m.experts.low_precision = mode
        xi = x.clone().requires_grad_()
        y = m(xi)[0]
        y.float().pow(2).sum().backward()
        outs[mode] = (y, xi.grad, m.experts.w_in.grad, m.experts.w_out.grad)
    a, b, bf = outs["fp8_rowwise:emulate"], outs["fp8_rowwise_wgrad:emulate"], outs["none"]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[3], b[3])                             # w_out's gradient took the FP8 wgrad
    for got, want in ((b[2], bf[2]), (b[3], bf[3])):
        rel = ((got.float() - want.float()).norm() / want.float().norm()).item()
        assert rel < 1e-1, rel


# ------------------------------------------------- the kernel's contract, emulated on CPU
@functools.cache   # a custom op registers once a process
def _contract_checked_sgmm():
    """A CPU stand-in for torch._scaled_grouped_mm as a custom op (so dynamo records
    it as one node): it refuses what the H200 kernel refuses (BENCHMARKS.md,
    eighteenth session: operand layouts, flat 1-D scales, 16-row groups in the 2d
    x 2d case) and computes through this project's float32 emulations."""
    from megacpp.ops.fp8_grouped import emulated_scaled_grouped_mm
    from megacpp.ops.fp8_grouped.reference import emulated_scaled_grouped_mm_2d2d

    @torch.library.custom_op("megacpp_test::scaled_grouped_mm", mutates_args=())
    def sgmm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             offs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        assert a.dtype == b.dtype == torch.float8_e4m3fn and a.stride(-1) == 1, "left operand row-major e4m3"
        assert b.stride(-2) == 1, "Expected mat2 to be transposed"
        if b.dim() == 2:
            E = offs.shape[0]
            assert scale_a.dim() == scale_b.dim() == 1, "scale must be a 1D tensor"
            assert scale_a.numel() == E * a.shape[0] and scale_b.numel() == E * b.shape[1]
            assert bool((offs % 16 == 0).all()), "group ends must be multiples of 16"
            return emulated_scaled_grouped_mm_2d2d(a, b, scale_a, scale_b, offs, out_dtype)
        return emulated_scaled_grouped_mm(a, b, scale_a, scale_b, offs, out_dtype)

    @sgmm.register_fake
    def _(a, b, scale_a, scale_b, offs, out_dtype):
        if b.dim() == 2:
            return a.new_empty((offs.shape[0], a.shape[0], b.shape[1]), dtype=out_dtype)
        return a.new_empty((a.shape[0], b.shape[-1]), dtype=out_dtype)

    def call(a, b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None,
             use_fast_accum=False):
        return sgmm(a, b, scale_a, scale_b, offs, out_dtype)
    return call


def test_fp8_path_with_fp8_wgrad_meets_the_kernel_contract_and_compiles_whole(seed, monkeypatch):
    """fp8_grouped_mm(..., fp8_wgrad=True) on its kernel path (quantizer "torch"),
    the kernel replaced by a contract-checking CPU stand-in: compiled with
    fullgraph (forward and backward, no graph break) it gives the emulated
    reference's output and gradients."""
    from torch._dynamo.utils import counters

    from megacpp.ops.fp8_grouped import fp8_grouped_mm, fp8_grouped_mm_reference
    from test_fp8_grouped import run

    monkeypatch.setattr(torch, "_scaled_grouped_mm", _contract_checked_sgmm())
    counts, x, w, g = _grouped_operands(seed, 4, 150, 32, 48, empty=1)
    want = run(lambda a, b, o: fp8_grouped_mm_reference(a, b, o, fp8_wgrad=True), x, w, counts, g)
    torch._dynamo.reset()
    counters["graph_break"].clear()
    fn = torch.compile(lambda a, b, o: fp8_grouped_mm(a, b, o, "torch", fp8_wgrad=True),
                       backend="aot_eager", fullgraph=True)
    got = run(fn, x, w, counts, g)
    assert not counters["graph_break"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not got[2][1].any()                                     # the empty expert
