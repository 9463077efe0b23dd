"""FP8 grouped GEMM for the MoE experts (ops.fp8_grouped) against references
written here independently: the quantization from frexp, the GEMMs per group
in float64. CPU: the emulated path (the op's pure-torch reference). CUDA:
torch._scaled_grouped_mm against that reference, forward and gradients."""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from megacpp.ops.fp8_grouped import (FP8, FP8_MAX, fp8_grouped_mm, fp8_grouped_mm_reference,
                                     fp8_grouped_unavailable, fp8_scale, quantize_fp8)
from ops_testutil import err_norm_max, randint

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
CHILD = os.environ.get("MEGACPP_FP8Q_INTERP_CHILD") == "1"
FP8_WHY = fp8_grouped_unavailable(torch.device("cuda")) if CUDA else "no CUDA"


def qdq(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Quantize-dequantize with one power-of-two scale per slice along dim,
    written from frexp: amax = m * 2^e with m in [0.5, 1); the scale is the
    smallest power of two s with amax / s <= 448."""
    amax = t.double().abs().amax(dim=dim, keepdim=True)
    m, e = torch.frexp(amax / FP8_MAX)
    s = torch.where(m == 0.5, torch.ldexp(torch.ones_like(m), e - 1), torch.ldexp(torch.ones_like(m), e))
    s = torch.where(amax > 0, s, torch.ones_like(s))
    return (t.double() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8).double() * s


def skip_unless_quantizer(quant: str) -> None:
    from megacpp.ops.fp8_grouped.quant_paths import torchao_import_error, triton_import_error
    why = {"torchao": torchao_import_error, "triton": triton_import_error}.get(quant, lambda: "")()
    if why:
        pytest.skip(why)


def random_groups(gen, E: int, A: int, empty: int | None = None) -> torch.Tensor:
    """Group sizes summing to A, unaligned, expert `empty` (if given) with none."""
    w = torch.rand(E, generator=gen) + 0.05
    if empty is not None:
        w[empty] = 0
    counts = (w / w.sum() * A).floor().long()
    counts[int(torch.argmax(w))] += A - int(counts.sum())
    return counts


def expected(x, w, g, counts):
    """(y, dx, dw) in float64 from the quantized operands, per group."""
    y = torch.zeros(x.shape[0], w.shape[-1], dtype=torch.float64)
    dx = torch.zeros(x.shape, dtype=torch.float64)
    dw = torch.zeros(w.shape, dtype=torch.float64)
    xq, gq = qdq(x, -1), qdq(g, -1)
    s = 0
    for e, c in enumerate(counts.tolist()):
        r = slice(s, s + c)
        y[r] = xq[r] @ qdq(w[e], 0)
        dx[r] = gq[r] @ qdq(w[e], 1).t()
        dw[e] = x[r].double().t() @ g[r].double()
        s += c
    return y, dx, dw


def run(fn, x, w, counts, g):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    offs = torch.cumsum(counts.to(x.device), 0).to(torch.int32)
    y = fn(x, w, offs)
    y.backward(g)
    return y, x.grad, w.grad


# ---------------------------------------------------------------- quantization
def test_scales_are_powers_of_two_that_fill_the_range(gen):
    rows = torch.randn(64, 96, generator=gen) * torch.logspace(-6, 4, 64)[:, None]
    rows[5] = 0
    q, s = quantize_fp8(rows, dim=-1)
    assert q.dtype == FP8 and s.shape == (64, 1) and s.dtype == torch.float32
    mant, _ = torch.frexp(s)
    assert (mant == 0.5).all()                                   # powers of two
    amax = rows.abs().amax(-1, keepdim=True)
    live = amax[:, 0] > 0
    ratio = (amax / s)[live]
    assert ((ratio > FP8_MAX / 2) & (ratio <= FP8_MAX)).all()    # the top binade used
    assert s[5].item() == 1.0 and (q[5].float() == 0).all()
    assert fp8_scale(torch.tensor([0.0, FP8_MAX, FP8_MAX * 1.5])).tolist() == [1.0, 1.0, 2.0]


def test_quantization_error_is_e4m3_rounding(gen):
    t = torch.randn(33, 200, generator=gen, dtype=torch.float32).to(torch.bfloat16)
    q, s = quantize_fp8(t, dim=0)                                # one scale per column
    deq = q.float() * s
    assert torch.equal(deq.double(), qdq(t, 0))
    normal = (t.float() / s).abs() >= 2.0 ** -6                  # e4m3's smallest normal
    rel = ((deq - t.float()).abs() / t.float().abs())[normal]
    assert rel.max() <= 2.0 ** -4 and rel.max() > 0              # 3 mantissa bits: half an ulp


# ---------------------------------------------------------------- the op (emulated)
@pytest.mark.parametrize("shape", [(5, 48, 80, 160), (3, 64, 32, 48)])
def test_reference_forward_and_gradients(gen, shape):
    E, A, K, N = shape
    counts = random_groups(gen, E, A, empty=1)
    x = torch.randn(A, K, generator=gen).to(torch.bfloat16)
    w = (torch.randn(E, K, N, generator=gen) * 0.05).to(torch.bfloat16)
    g = torch.randn(A, N, generator=gen).to(torch.bfloat16)
    y, dx, dw = run(fp8_grouped_mm_reference, x, w, counts, g)
    ey, edx, edw = expected(x, w, g, counts)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    for got, want in ((y, ey), (dx, edx), (dw, edw)):
        n, m = err_norm_max(got, want)
        assert n < 4e-3 and m < 8e-3, (n, m)                    # bf16 rounding of the outputs only
    assert (dw[1] == 0).all()                                    # the empty expert


def test_reference_is_close_to_the_bf16_gemm_and_not_equal(gen):
    E, A, K, N = 4, 256, 128, 96
    counts = random_groups(gen, E, A)
    x = torch.randn(A, K, generator=gen).to(torch.bfloat16)
    w = (torch.randn(E, K, N, generator=gen) * 0.05).to(torch.bfloat16)
    g = torch.randn(A, N, generator=gen).to(torch.bfloat16)
    y, dx, dw = run(fp8_grouped_mm_reference, x, w, counts, g)
    s, yy, ddx = 0, torch.zeros(A, N, dtype=torch.float64), torch.zeros(A, K, dtype=torch.float64)
    for e, c in enumerate(counts.tolist()):
        yy[s:s + c] = x[s:s + c].double() @ w[e].double()
        ddx[s:s + c] = g[s:s + c].double() @ w[e].double().t()
        s += c
    for got, want in ((y, yy), (dx, ddx)):
        n, _ = err_norm_max(got, want)
        assert 1e-2 < n < 6e-2, n                                # e4m3 on both operands: ~3.7% here


def test_moe_with_fp8_experts_tracks_bf16(gen):
    import megacpp
    from megacpp.model.moe import MoE
    r = megacpp.load_recipe("nam-tiny")
    torch.manual_seed(randint(gen, 0, 2 ** 30))
    ref = MoE(r.model).to(torch.bfloat16)
    ref.init_weights(0.05, 0.05)
    fp8 = MoE(r.model).to(torch.bfloat16)
    fp8.load_state_dict(ref.state_dict())
    fp8.experts.low_precision = "fp8_rowwise:emulate"
    x = torch.randn(2, 24, r.model.hidden_size, generator=gen).to(torch.bfloat16)
    outs = []
    for m in (ref, fp8):
        xi = x.clone().requires_grad_()
        y = m(xi)[0]
        y.float().pow(2).sum().backward()
        outs.append((y, xi.grad, m.experts.w_in.grad))
    errs = {k: err_norm_max(a, b)[0] for k, a, b in zip(("y", "dx", "dw_in"), outs[1], outs[0])}
    # y passes two FP8 GEMMs; w_in's gradient comes through w_out's FP8 input gradient
    assert errs["y"] < 5e-2 and errs["dx"] < 1e-1 and errs["dw_in"] < 1e-1, errs
    assert not torch.equal(outs[0][0], outs[1][0])               # the FP8 path ran


# ---------------------------------------------------------------- CUDA: the kernel
@pytest.mark.gpu
@pytest.mark.skipif(FP8_WHY is not None, reason=f"FP8 grouped GEMM unavailable: {FP8_WHY}")
@pytest.mark.parametrize("shape", [(8, 4000, 2048, 2816), (8, 3001, 1408, 2048), (8, 777, 768, 1536),
                                   (3, 100, 64, 32)])
@pytest.mark.parametrize("quant", ["torch", "torchao", "triton"])
def test_cuda_kernel_matches_reference(seed, shape, quant):
    skip_unless_quantizer(quant)
    gen = torch.Generator().manual_seed(seed)
    E, A, K, N = shape
    counts = random_groups(gen, E, A, empty=E - 1)
    x = torch.randn(A, K, generator=gen).to(torch.bfloat16)
    w = (torch.randn(E, K, N, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
    g = torch.randn(A, N, generator=gen).to(torch.bfloat16)
    want = run(fp8_grouped_mm_reference, x, w, counts, g)
    dev = [t.cuda() for t in (x, w, counts, g)]
    got = run(lambda a, b, o: fp8_grouped_mm(a, b, o, quant), *dev)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        n, m = err_norm_max(a.cpu(), b)
        # the same FP8 products in another summation order (the forward with
        # the kernel's fast accumulation), rounded to bf16
        assert n < 1e-2 and m < 3e-2, (name, n, m)
    assert (got[2][E - 1] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(FP8_WHY is not None, reason=f"FP8 grouped GEMM unavailable: {FP8_WHY}")
@pytest.mark.parametrize("quant", ["torchao", "torch", "triton"])
def test_cuda_compiled_matches_eager(seed, quant):
    skip_unless_quantizer(quant)
    gen = torch.Generator().manual_seed(seed)
    E, A, K, N = 8, 2048, 512, 768
    counts = random_groups(gen, E, A)
    x, w, g = (torch.randn(*s, generator=gen).to(torch.bfloat16).cuda() for s in ((A, K), (E, K, N), (A, N)))
    w = w / math.sqrt(K)

    def fn(a, b, offs):
        return fp8_grouped_mm(a, b, offs, quant)

    eager = run(fn, x, w, counts.cuda(), g)
    torch._dynamo.reset()
    comp = run(torch.compile(fn, fullgraph=True), x, w, counts.cuda(), g)
    for a, b in zip(comp, eager):
        n, _ = err_norm_max(a, b)
        assert n < 2e-3, n


# ---------------------------------------------------------------- the quantizers
def test_quant_choice_reads_the_env(monkeypatch):
    from megacpp.ops.fp8_grouped import quant_path
    monkeypatch.setenv("MEGACPP_FP8_QUANT", "torch")
    assert quant_path(torch.device("cuda")) == "torch"
    monkeypatch.setenv("MEGACPP_FP8_QUANT", "bogus")
    with pytest.raises(ValueError, match="MEGACPP_FP8_QUANT='bogus'"):
        quant_path(torch.device("cuda"))
    monkeypatch.delenv("MEGACPP_FP8_QUANT")
    # the default ("auto"): the one-pass Triton kernel on CUDA where it imports, else pure torch
    from megacpp.ops.fp8_grouped.quant_paths import triton_import_error
    assert quant_path(torch.device("cuda")) == ("torch" if triton_import_error() else "triton")
    assert quant_path(torch.device("cpu")) == "torch"
    monkeypatch.setenv("MEGACPP_FP8_QUANT", "auto")
    assert quant_path(torch.device("cuda")) == ("torch" if triton_import_error() else "triton")
    # rows wider than the Triton kernel holds: "auto" takes pure torch, an explicit "triton" fails
    from megacpp.ops.fp8_grouped.quant_paths import TRITON_MAX_ROW
    assert quant_path(torch.device("cuda"), TRITON_MAX_ROW + 1) == "torch"
    if not triton_import_error():
        assert quant_path(torch.device("cuda"), TRITON_MAX_ROW) == "triton"
        monkeypatch.setenv("MEGACPP_FP8_QUANT", "triton")
        with pytest.raises(RuntimeError, match=f"rows of {TRITON_MAX_ROW + 1} elements exceed"):
            quant_path(torch.device("cuda"), TRITON_MAX_ROW + 1)
    monkeypatch.setenv("MEGACPP_FP8_QUANT", "torchao")
    assert quant_path(torch.device("cpu")) == "torch"           # torchao's kernels are CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(FP8_WHY is not None, reason=f"FP8 grouped GEMM unavailable: {FP8_WHY}")
@pytest.mark.parametrize("quant", ["torchao", "triton"])
def test_cuda_quantizers_give_the_same_bytes(seed, quant):
    from megacpp.ops.fp8_grouped import QUANT
    skip_unless_quantizer(quant)
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(3001, 1408, generator=gen) * torch.logspace(-3, 3, 3001)[:, None]).to(torch.bfloat16).cuda()
    t[7] = 0
    w = (torch.randn(8, 2048, 2816, generator=gen) * 0.02).to(torch.bfloat16).cuda()
    a, b = QUANT[quant], QUANT["torch"]
    for name, fn in (("rows", lambda q: q.rows(t)), ("weight_fwd", lambda q: q.weight_fwd(w)),
                     ("weight_dgrad", lambda q: q.weight_dgrad(w))):
        (qa, sa), (qb, sb) = fn(a), fn(b)
        assert qa.shape == qb.shape and qa.stride() == qb.stride(), (name, qa.stride(), qb.stride())
        assert torch.equal(qa.view(torch.uint8), qb.view(torch.uint8)), name
        live = torch.ones_like(sb, dtype=torch.bool)
        if name == "rows":
            live[7] = False                                      # an all-zero row: any scale
        assert torch.equal(sa[live], sb[live]), name


# ---------------------------------------------------------------- the Triton quantizer on CPU
interp_only = pytest.mark.skipif(not (CHILD and HAS_TRITON), reason="runs in the TRITON_INTERPRET=1 child of "
                                 "test_triton_interpreter.py")


@interp_only
@pytest.mark.parametrize("shape", [(37, 300), (5, 2816), (1, 16)])
def test_cpu_interp_triton_rows_give_the_same_bytes(seed, shape):
    from megacpp.ops.fp8_grouped.triton_quant import fp8_rows_triton
    gen = torch.Generator().manual_seed(seed)
    M, K = shape
    t = (torch.randn(M, K, generator=gen) * torch.logspace(-4, 4, M)[:, None]).to(torch.bfloat16)
    if M > 8:
        t[5] = 0                                                  # an all-zero row
        t[6, 3] = 448 * 4                                         # an amax on a power-of-two boundary
        t[7] *= 1e-3                                              # most of a row in e4m3's subnormals
        t[7, 0] = 100.0
        t[8, :4] = torch.tensor([-0.0, 31.5, -100.0, 1e-9])       # ties, and a signed zero
        t[8, 4] = 448.0
    q, s = fp8_rows_triton(t)
    qr, sr = quantize_fp8(t, dim=-1)
    assert q.dtype == FP8 and s.shape == (M,)
    assert torch.equal(s, sr.squeeze(-1))
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)), (q.view(torch.uint8) != qr.view(torch.uint8)).sum()


@interp_only
def test_cpu_interp_triton_rows_read_strided_rows(seed):
    from megacpp.ops.fp8_grouped.triton_quant import fp8_rows_triton
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(20, 96, generator=gen).to(torch.bfloat16)
    view = base[:, 16:80]                                          # row stride 96, not 64
    q, s = fp8_rows_triton(view)
    qr, sr = quantize_fp8(view.contiguous(), dim=-1)
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s, sr.squeeze(-1))


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_rows_refuse_bad_operands():
    from megacpp.ops.fp8_grouped.triton_quant import MAX_K, fp8_rows_triton
    with pytest.raises(ValueError, match="2-D operand"):
        fp8_rows_triton(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="MAX_K"):
        fp8_rows_triton(torch.zeros(2, MAX_K + 1))


# this file's interpreter tests (the `cpu_interp` ones) and the variable that marks the
# child they run in: test_triton_interpreter.py runs every op's in one child process
INTERP_CHILD = ("MEGACPP_FP8Q_INTERP_CHILD", 4)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_row_limit_is_the_one_the_choice_reads():
    from megacpp.ops.fp8_grouped.quant_paths import TRITON_MAX_ROW
    from megacpp.ops.fp8_grouped.triton_quant import MAX_K
    assert MAX_K == TRITON_MAX_ROW


def test_widest_expert_row_covers_every_rowwise_operand():
    import megacpp
    from megacpp import load_recipe
    from megacpp.train.lowp import _widest_expert_row
    spec = load_recipe("nam-tiny").model
    model = megacpp.build_model(spec)
    d, ffn = spec.hidden_size, spec.moe.expert_ffn
    assert _widest_expert_row(model) == max(d, 2 * ffn, ffn)   # SwiGLU experts: w_in is d x 2*ffn
    assert _widest_expert_row(megacpp.build_model(load_recipe("dense-125m").model)) == 0
