"""FlexAttention backend for packed rows vs the SDPA-with-mask reference.

torch 2.13 runs FlexAttention forward on CPU (eager and compiled) but has
no CPU backward, so the CPU tests compare outputs under no_grad and the
gradient test needs CUDA. Most tests use eager flex (it materialises the
scores, fine at these sizes) so that the suite does not pay a compile per
shape; two tests take the compiled paths: the module-level compiled
function, and flex traced inside a compiled block as the trainer runs it.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import megacpp
from megacpp.model import attention
from megacpp.model.context import SeqContext

from model_testutil import ALL_LETTER_SPECS, FAMILY_SPECS, build, make_spec

pytestmark = pytest.mark.skipif(attention._flex_attention is None,
                                reason="this torch has no torch.nn.attention.flex_attention")

ATTN = ["gqa", "gqa-full-rotary-no-qknorm", "mla", "mla-qlora"]


@pytest.fixture
def eager_flex(monkeypatch):
    """Flex without compiling: stands in for the module's compiled function."""
    monkeypatch.setattr(attention, "_FLEX_COMPILED", attention._flex_attention)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def _doc_ids(b: int, t: int) -> torch.Tensor:
    """Rows whose boundaries avoid flex's 128-token blocks: a document that
    straddles a block edge, a one-token document, a single-document row."""
    rows = []
    for r in range(b):
        if r == b - 1:
            rows.append(torch.zeros(t, dtype=torch.long))
            continue
        cuts = sorted({int(c) for c in torch.randint(1, t, (3,))} | {min(127 + r, t - 1), min(130, t - 1)})
        d = torch.zeros(t, dtype=torch.long)
        for c in cuts:
            d[c:] += 1
        rows.append(d)
    return torch.stack(rows)


def _mixer_out(mixer, x, doc, backend, monkeypatch):
    monkeypatch.setattr(attention, "ATTENTION_BACKEND", backend)
    ctx = SeqContext(x.shape[0], x.shape[1], x.device, doc)
    y, _, _ = mixer(x, ctx)
    return y, ctx


def _block_any(mask: torch.Tensor, block: int = 128) -> torch.Tensor:
    """(b, 1, t, t) element mask -> (b, 1, nq, nk): does each block hold a True."""
    t = mask.shape[-1]
    n = -(-t // block)
    pad = n * block - t
    m = torch.nn.functional.pad(mask, (0, pad, 0, pad))
    return m.view(*m.shape[:2], n, block, n, block).any(dim=5).any(dim=3)


@pytest.mark.parametrize("t", [200, 256, 300])
def test_block_mask_equals_attn_mask(t, seed):
    from torch.nn.attention.flex_attention import create_mask

    doc = _doc_ids(3, t)
    doc[1] = doc[1] % 2  # non-adjacent runs with one id count as one document, as in attn_mask
    ctx = SeqContext(3, t, "cpu", doc)
    bm, ref = ctx.block_mask(), ctx.attn_mask()
    assert bm is ctx.block_mask()  # memoised: one per forward, shared by the layers
    assert torch.equal(create_mask(bm.mask_mod, 3, 1, t, t, device="cpu"), ref)
    # The blocks flex visits are exactly those that hold an allowed pair.
    assert torch.equal(bm.to_dense().bool(), _block_any(ref))


def test_backend_choice(monkeypatch):
    monkeypatch.delenv("MEGACPP_ATTENTION", raising=False)
    assert attention.attention_backend("cpu") == "sdpa"
    # the CUDA default since its gradients matched SDPA's there (the choice needs no GPU)
    assert attention.attention_backend("cuda") == ("flex" if attention._flex_attention is not None else "sdpa")
    # heads below 16 stay on SDPA (flex's compiled kernel refuses them)
    flex = "flex" if attention._flex_attention is not None else "sdpa"
    assert attention.attention_backend("cuda", attention.FLEX_MIN_HEAD_DIM) == flex
    assert attention.attention_backend("cuda", attention.FLEX_MIN_HEAD_DIM - 1) == "sdpa"
    monkeypatch.setenv("MEGACPP_ATTENTION", "flex")
    assert attention.attention_backend("cpu") == "flex"
    assert attention.attention_backend("cpu", 8) == "flex"  # forcing wins
    monkeypatch.setattr(attention, "ATTENTION_BACKEND", "sdpa")  # the module switch wins
    assert attention.attention_backend("cpu") == "sdpa"
    monkeypatch.setattr(attention, "ATTENTION_BACKEND", "flash")
    with pytest.raises(ValueError):
        attention.attention_backend("cpu")


class _FakeQ:
    """What flex_kernel_options reads of q, for a CUDA case without a GPU."""
    def __init__(self, head_dim, dtype=torch.bfloat16, index=0):
        self.is_cuda, self.dtype, self.shape = True, dtype, (2, 8, 4, head_dim)
        self.device = torch.device("cuda", index)


def test_flex_launch_table_and_forcing(monkeypatch):
    """Tuned launches apply only on the capability and head dim they were
    swept at, in half dtypes; MEGACPP_FLEX_OPTIONS replaces them; bad JSON
    names the variable."""
    monkeypatch.delenv("MEGACPP_FLEX_OPTIONS", raising=False)
    monkeypatch.setattr(attention, "FLEX_TUNED", {(9, 0, 64): {"bwd_num_warps": 4}})
    monkeypatch.setattr(attention, "_CAPABILITY", {0: (9, 0), 1: (8, 0)})
    attention.note_flex_device("cpu")
    assert attention.flex_kernel_options(_FakeQ(64)) == {"bwd_num_warps": 4}
    assert attention.flex_kernel_options(_FakeQ(128)) is None            # head dim not swept
    assert attention.flex_kernel_options(_FakeQ(64, index=1)) is None    # another GPU
    assert attention.flex_kernel_options(_FakeQ(64, torch.float32)) is None
    assert attention.flex_kernel_options(torch.zeros(2, 8, 4, 64)) is None  # CPU
    monkeypatch.setenv("MEGACPP_FLEX_OPTIONS", '{"fwd_BLOCK_M": 64}')
    attention.note_flex_device("cpu")
    assert attention.flex_kernel_options(_FakeQ(128)) == {"fwd_BLOCK_M": 64}
    monkeypatch.setenv("MEGACPP_FLEX_OPTIONS", "BLOCK_M=64")
    with pytest.raises(ValueError, match="MEGACPP_FLEX_OPTIONS: not JSON"):
        attention.note_flex_device("cpu")
    monkeypatch.delenv("MEGACPP_FLEX_OPTIONS")
    attention.note_flex_device("cpu")


def test_model_hands_the_forced_launch_to_flex(monkeypatch, seed):
    """A hybrid's packed A layers pass the launch options to FlexAttention (a
    stand-in records them), and the run record says which launch it was."""
    from megacpp.train.trainer import _attention_backend
    seen = []

    def fake_flex(q, k, v, block_mask=None, enable_gqa=False, kernel_options=None):
        seen.append(kernel_options)
        return torch.zeros_like(q)

    monkeypatch.setattr(attention, "ATTENTION_BACKEND", "flex")
    monkeypatch.setattr(attention, "_flex_fn", lambda: fake_flex)
    monkeypatch.setenv("MEGACPP_FLEX_OPTIONS", '{"bwd_BLOCK_M1": 32}')
    model = build(make_spec("AMA"), torch.float32)
    ids = torch.randint(0, model.spec.vocab_size, (2, 40))
    doc = torch.zeros(2, 40, dtype=torch.long)
    doc[:, 25:] = 1
    with torch.no_grad():
        model(ids, doc_ids=doc)
    assert seen == [{"bwd_BLOCK_M1": 32}] * 2
    assert _attention_backend(model, "cpu") == 'flex (launch: MEGACPP_FLEX_OPTIONS {"bwd_BLOCK_M1": 32})'
    monkeypatch.delenv("MEGACPP_FLEX_OPTIONS")
    assert _attention_backend(model, "cpu") == "flex (launch: inductor default)"


@pytest.mark.parametrize("t", [200, 256])
@pytest.mark.parametrize("name", ATTN)
def test_layer_flex_equals_sdpa(name, t, seed, eager_flex, monkeypatch):
    mixer = build(FAMILY_SPECS[name], torch.float32).layers[0].mixer
    x = torch.randn(3, t, FAMILY_SPECS[name].hidden_size)
    doc = _doc_ids(3, t)
    with torch.no_grad():
        ref, _ = _mixer_out(mixer, x, doc, "sdpa", monkeypatch)
        out, ctx = _mixer_out(mixer, x, doc, "flex", monkeypatch)
    assert "attn_mask" not in ctx._memo  # the flex path never builds the O(t^2) mask
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _model_flex_and_sdpa(model, monkeypatch, prepare_flex=None, t: int = 200):
    """No-grad logits of model on SDPA's backend, then (after prepare_flex(),
    if given) on flex's, for three packed rows of t tokens: (flex, sdpa)."""
    ids = torch.randint(0, model.spec.vocab_size, (3, t))
    doc = _doc_ids(3, t)
    with torch.no_grad():
        monkeypatch.setattr(attention, "ATTENTION_BACKEND", "sdpa")
        ref = model(ids, doc_ids=doc).logits
        monkeypatch.setattr(attention, "ATTENTION_BACKEND", "flex")
        if prepare_flex is not None:
            prepare_flex()
        out = model(ids, doc_ids=doc).logits
    return out, ref


@pytest.mark.parametrize("name", ["ADMREF-mamba2-gqa", "ADMREF-mamba3-mla"])
def test_model_flex_equals_sdpa(name, seed, eager_flex, monkeypatch):
    model = build(ALL_LETTER_SPECS[name], torch.float32)
    out, ref = _model_flex_and_sdpa(model, monkeypatch)
    # float32 summation order (flex vs SDPA) through the whole model: over 60
    # seeds the largest logit gap was 1.03e-5 on logits up to ~3.7 (and a CI
    # run hit 1.2e-5 at atol 1e-5); a document-mask error is ~1e-1
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=3e-5)


def test_compiled_flex_function(seed, monkeypatch):
    """The module-level compiled flex: one compile, reused for new documents."""
    from megacpp.train.compile import compile_stats

    monkeypatch.setattr(attention, "_FLEX_COMPILED", None)
    mixer = build(FAMILY_SPECS["gqa"], torch.float32).layers[0].mixer
    x = torch.randn(2, 200, FAMILY_SPECS["gqa"].hidden_size)
    with torch.no_grad():
        for _ in range(2):
            doc = _doc_ids(2, 200)
            ref, _ = _mixer_out(mixer, x, doc, "sdpa", monkeypatch)
            before = compile_stats()["recompiles"]
            out, _ = _mixer_out(mixer, x, doc, "flex", monkeypatch)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attention._FLEX_COMPILED is not None
    assert compile_stats()["recompiles"] == before


def test_flex_inside_compiled_block(seed, monkeypatch):
    """As the trainer runs it: the block compiled, flex traced inside (no nested compile)."""
    monkeypatch.setattr(attention, "_FLEX_COMPILED", None)
    spec = FAMILY_SPECS["mla"]
    block = build(spec, torch.float32).layers[0]
    x = torch.randn(2, 200, spec.hidden_size)
    doc = _doc_ids(2, 200)
    compiled = torch.compile(block, dynamic=False)
    with torch.no_grad():
        monkeypatch.setattr(attention, "ATTENTION_BACKEND", "sdpa")
        ref = block(x, SeqContext(2, 200, "cpu", doc))[0]
        monkeypatch.setattr(attention, "ATTENTION_BACKEND", "flex")
        out = compiled(x, SeqContext(2, 200, "cpu", doc))[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert attention._FLEX_COMPILED is None  # flex was lowered by the block's compile


def test_flex_inside_compiled_model(seed, monkeypatch):
    """Compile scope "model" (HybridLM.compile_body): the sequence context, the
    block mask with it, is built eagerly and the rest is one graph with no
    break, flex traced inside it; no-grad outputs equal the eager SDPA
    model's. (Traced into the graph, the block mask made inductor read out
    of bounds on CUDA at the first evaluation: H200, 2026-11-28; the GPU test
    below runs that case.)"""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(attention, "_FLEX_COMPILED", None)
    # no E layer: in float32 off CUDA the experts take the padded path, whose
    # capacity is a host value (a graph break of its own); on CUDA in bf16 they
    # take torch._grouped_mm (the GPU test below has them). No R layer either:
    # inductor's CPU compile of the reference delta rule is ~40 s of this suite;
    # the next test traces AMRF with flex through dynamo alone.
    model = build(make_spec("AMF"), torch.float32)

    def compile_body():
        counters["graph_break"].clear()
        model.compile_body(dynamic=False)

    out, ref = _model_flex_and_sdpa(model, monkeypatch, compile_body)
    breaks = dict(counters["graph_break"])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=3e-5)
    assert breaks == {}, breaks
    assert attention._FLEX_COMPILED is None  # flex was lowered by the model's compile


def test_flex_model_with_every_scan_traces_to_one_graph(seed, monkeypatch):
    """Scope "model" over A, M, R and F layers with flex: dynamo alone (a
    capturing backend, no inductor) makes one graph with no break, and its
    no-grad logits equal the eager SDPA model's."""
    from torch._dynamo.utils import counters

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = build(make_spec("AMRF"), torch.float32)

    def compile_body():
        counters["graph_break"].clear()
        model.compile_body(backend=capture, dynamic=False)

    out, ref = _model_flex_and_sdpa(model, monkeypatch, compile_body)
    assert dict(counters["graph_break"]) == {} and len(graphs) == 1, (dict(counters["graph_break"]), len(graphs))
    traced = {str(n.target) for n in graphs[0].graph.nodes}
    assert any("flex_attention" in t for t in traced), sorted(traced)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=3e-5)


def test_compiled_body_takes_rotary_tables_as_inputs():
    """Scope "model" must not trace the rotary tables: inductor recomputed their
    float64 cos/sin inside every attention layer's kernels (+10 ms of nam-125m's
    step on an H200, 2026-11-28). The body's graph has no cos or sin."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = build(make_spec("AMRF"), torch.float32)
    model.compile_body(backend=capture, dynamic=False)
    ids = torch.randint(0, model.spec.vocab_size, (2, 64))
    doc = torch.zeros(2, 64, dtype=torch.long)
    doc[:, 40:] = 1
    model(ids, doc_ids=doc)
    assert graphs, "the body was not compiled"
    traced = {str(n.target) for gm in graphs for n in gm.graph.nodes}
    assert not any("cos" in t or "sin" in t for t in traced), sorted(traced)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the failure it guards against was CUDA's")
def test_flex_inside_compiled_model_cuda(seed):
    """The scope "model" case that failed on an H200: one graph for the model,
    a training step, then a no-grad forward; both equal the eager SDPA model."""
    spec = make_spec("ADMREF", hidden_size=64, mamba={"version": 2},
                     attention={"kind": "gqa", "qk_head_dim": 16},
                     moe={"score": "sigmoid", "bias_balancing": True})
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    old_backend = attention.ATTENTION_BACKEND
    try:
        model = build(spec, torch.float32).cuda()
        ids = torch.randint(0, spec.vocab_size, (3, 300), device="cuda")
        doc = _doc_ids(3, 300).cuda()
        attention.ATTENTION_BACKEND = "sdpa"
        ref = model(ids, doc_ids=doc).logits
        ref.float().square().mean().backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        attention.ATTENTION_BACKEND = "flex"
        model.compile_body(dynamic=False)  # what compile scope "model" does
        out = model(ids, doc_ids=doc).logits
        out.float().square().mean().backward()
        with torch.no_grad():
            evaluated = model(ids, doc_ids=doc).logits
        torch.cuda.synchronize()
    finally:
        attention.ATTENTION_BACKEND = old_backend
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(evaluated, ref.detach(), rtol=1e-4, atol=1e-4)
    for n, g in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-4, msg=n)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="torch has no FlexAttention backward on CPU: gradients need CUDA")
@pytest.mark.parametrize("version,kind", [(2, "gqa"), (3, "mla")])
def test_model_flex_gradients_cuda(version, kind, seed):
    # flex's CUDA kernels need head dims >= 16: the test specs' 8 would not lower
    spec = make_spec("ADMREF", hidden_size=64, mamba={"version": version},
                     attention={"kind": kind, "qk_head_dim": 8, "qk_rope_dim": 8, "v_head_dim": 16},
                     moe={"score": "sigmoid", "bias_balancing": True})
    # TF32 would blur the float32 comparison by ~1e-3 (flex's kernel follows this flag too)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _flex_vs_sdpa_gradients(spec)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="torch has no FlexAttention backward on CPU: gradients need CUDA")
def test_tuned_flex_launch_matches_sdpa_cuda(seed):
    """Head dim 64 under bf16 autocast: on the GPUs FLEX_TUNED lists, the model's
    flex layers take the swept launch; logits and gradients stay within bf16
    error of SDPA's (a wrong launch, e.g. a mask block skipped, is far off)."""
    spec = make_spec("AFAF", hidden_size=256, attention={"kind": "gqa", "num_heads": 4, "num_kv_heads": 2})
    model = build(spec, torch.float32).cuda()
    ids = torch.randint(0, spec.vocab_size, (2, 1024), device="cuda")
    doc = _doc_ids(2, 1024).cuda()
    cap = torch.cuda.get_device_capability()
    tuned = attention.FLEX_TUNED.get((cap[0], cap[1], 64))
    q = torch.zeros(1, 1, 1, 64, device="cuda", dtype=torch.bfloat16)
    outs = {}
    old_backend = attention.ATTENTION_BACKEND
    try:
        for backend in ("sdpa", "flex"):
            attention.ATTENTION_BACKEND = backend
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = model(ids, doc_ids=doc).logits
            out.float().square().mean().backward()
            outs[backend] = (out.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                    if p.grad is not None})
            if backend == "flex":
                assert attention.flex_kernel_options(q) == tuned
    finally:
        attention.ATTENTION_BACKEND = old_backend
    (ref, g_ref), (out, g_out) = outs["sdpa"], outs["flex"]

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    assert rel(out, ref) < 2e-2
    for n in g_ref:
        assert rel(g_out[n], g_ref[n]) < 5e-2, n


def _flex_vs_sdpa_gradients(spec):
    model = build(spec, torch.float32).cuda()
    t = 300
    ids = torch.randint(0, spec.vocab_size, (3, t), device="cuda")
    doc = _doc_ids(3, t).cuda()
    grads = {}
    old_backend = attention.ATTENTION_BACKEND
    for backend in ("sdpa", "flex"):
        attention.ATTENTION_BACKEND = backend
        model.zero_grad(set_to_none=True)
        out = model(ids, doc_ids=doc).logits
        out.float().square().mean().backward()
        grads[backend] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                         if p.grad is not None})
    attention.ATTENTION_BACKEND = old_backend
    (ref, g_ref), (out, g_out) = grads["sdpa"], grads["flex"]
    # float32 kernels that sum in another order: on an H200 (2026-11-28) one
    # logit in 87,300 differed by 1.5e-5 at rtol/atol 1e-5. A mask fault (a
    # token seeing another document) changes its output by a share of the
    # attention weights, far above 1e-4 at these sizes.
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert g_ref.keys() == g_out.keys()
    for n in g_ref:
        torch.testing.assert_close(g_out[n], g_ref[n], rtol=1e-4, atol=1e-4, msg=n)


def test_model_backend_follows_head_dims(monkeypatch):
    """A model with 8-dim heads records and builds SDPA masks on CUDA, one with
    16-dim heads flex; the choice needs no GPU."""
    monkeypatch.delenv("MEGACPP_ATTENTION", raising=False)
    if attention._flex_attention is None:
        pytest.skip("torch without flex_attention")
    small = megacpp.build_model(make_spec("A"))                    # head dim 32/4 = 8
    big = megacpp.build_model(make_spec("A", attention={"num_heads": 2, "num_kv_heads": 1}))  # 16
    assert attention.model_attention_backend(small, "cuda") == "sdpa"
    assert attention.model_attention_backend(big, "cuda") == "flex"
    assert attention.model_attention_backend(big, "cpu") == "sdpa"
    assert attention.model_attention_backend(megacpp.build_model(make_spec("M")), "cuda") == "none"
