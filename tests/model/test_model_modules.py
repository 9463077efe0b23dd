"""Sublayers against explicit formulas, plus norms, packing helpers, init and the output object."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import megacpp
from megacpp.model.context import SeqContext, causal_conv1d, positions_from_doc_ids
from megacpp.model.mamba import segmented_cumsum
from megacpp.model.norm import GatedRMSNorm, LayerNorm, RMSNorm
from megacpp.ops.dsa_index.reference import indexer_scores_naive, indexer_topk_naive

from model_testutil import ALL_LETTER_SPECS, FAMILY_SPECS, build, make_spec

D64 = torch.float64


def _rot(v, phi):
    """Half-split pair rotation written out (independent of model.rotary)."""
    h = phi.shape[-1]
    c, s = torch.cos(phi), torch.sin(phi)
    v1, v2 = v[..., :h], v[..., h:2 * h]
    return torch.cat([v1 * c - v2 * s, v2 * c + v1 * s, v[..., 2 * h:]], dim=-1)


def test_mamba3_matches_explicit_trapezoid_recurrence(seed):
    spec = FAMILY_SPECS["mamba3"]
    mix = build(spec).layers[0].mamba
    b, t = 2, 19
    u = torch.randn(b, t, spec.hidden_size, dtype=D64)
    y, _, _ = mix(u, SeqContext(b, t, u.device))
    z, x, B, C, dt, A, lam, dphi = mix._prep(u)
    H, P, N = mix.heads, mix.head_dim, mix.state_dim
    h = torch.zeros(b, H, P, N, dtype=D64)
    prev = torch.zeros(b, H, P, N, dtype=D64)   # x_{t-1} B_{t-1}^T
    phi = torch.zeros(b, H, N // 2, dtype=D64)
    ys = []
    for i in range(t):
        phi = phi + dphi[:, i]
        Bt, Ct = _rot(B[:, i], phi), _rot(C[:, i], phi)
        a = torch.exp(dt[:, i] * A)                          # (b, H)
        beta = (1 - lam[:, i]) * dt[:, i] * a
        gamma = lam[:, i] * dt[:, i]
        cur = x[:, i, :, :, None] * Bt[:, :, None, :]
        h = a[..., None, None] * h + beta[..., None, None] * prev + gamma[..., None, None] * cur
        prev = cur
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ct) + mix.D[:, None] * x[:, i])
    yy = torch.stack(ys, 1).reshape(b, t, -1)
    ref = mix.out_proj(mix.norm(yy, z))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-9)


def test_mamba2_matches_explicit_recurrence(seed):
    spec = FAMILY_SPECS["mamba2"]
    mix = build(spec).layers[0].mamba
    b, t = 2, 13
    u = torch.randn(b, t, spec.hidden_size, dtype=D64)
    y, _, _ = mix(u, SeqContext(b, t, u.device))
    z, xbc, dt_raw = mix._split(mix.in_proj(u))
    K = mix.conv1d.weight.shape[-1]
    pad = F.pad(xbc, (0, 0, K - 1, 0))
    conv = torch.stack([(pad[:, i:i + K] * mix.conv1d.weight[:, 0].T).sum(1) for i in range(t)], 1)
    x, B, C = mix._xbc(F.silu(conv + mix.conv1d.bias))
    dt = F.softplus(dt_raw + mix.dt_bias)
    A = -torch.exp(mix.A_log)
    rep = mix.heads // mix.groups
    h = torch.zeros(b, mix.heads, mix.head_dim, mix.state_dim, dtype=D64)
    ys = []
    for i in range(t):
        Bh, Ch = B[:, i].repeat_interleave(rep, 1), C[:, i].repeat_interleave(rep, 1)
        h = torch.exp(dt[:, i] * A)[..., None, None] * h + (dt[:, i, :, None] * x[:, i])[..., None] * Bh[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch) + mix.D[:, None] * x[:, i])
    ref = mix.out_proj(mix.norm(torch.stack(ys, 1).reshape(b, t, -1), z))
    torch.testing.assert_close(y, ref, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_dsa_attends_to_selected_keys_only(kind, seed):
    spec = FAMILY_SPECS[f"dsa-{kind}"]
    attn = build(spec).layers[0].attention
    b, t = 2, 23
    x = torch.randn(b, t, spec.hidden_size, dtype=D64)
    ctx = SeqContext(b, t, x.device)
    y, st, _ = attn(x, ctx)
    cos, sin = ctx.rope(attn.rot_dim, attn.theta)
    q, pieces = attn._project(x, cos[:, :, None], sin[:, :, None])
    k, v = attn._expand(pieces)
    iq, ik, iw = attn.indexer(x, ctx.positions)
    topk = spec.attention.index_topk
    idx, _ = indexer_topk_naive(iq, ik, iw, topk)
    assert torch.equal(st.indices, idx)
    H, g = q.shape[2], q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5
    o = torch.zeros(b, t, H, v.shape[-1], dtype=D64)
    target = torch.zeros(b, t, topk, dtype=D64)
    for bi in range(b):
        for ti in range(t):
            keys = idx[bi, ti][idx[bi, ti] >= 0]
            assert len(keys) == min(ti + 1, topk) and torch.all(keys <= ti)
            for hh in range(H):
                p = torch.softmax((k[bi, keys, hh // g] @ q[bi, ti, hh]) * scale, 0)
                o[bi, ti, hh] = p @ v[bi, keys, hh // g]
                target[bi, ti, : len(keys)] += p / H
    torch.testing.assert_close(y, attn.o_proj(o.reshape(b, t, -1)), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(st.attn_target, target, atol=1e-10, rtol=1e-9)
    naive = indexer_scores_naive(iq, ik, iw)
    want = torch.gather(naive, -1, idx.clamp(min=0)).masked_fill(idx < 0, float("-inf"))
    torch.testing.assert_close(st.index_scores, want, atol=1e-10, rtol=1e-9)


def test_dsa_gradients_are_separated(seed):
    """The LM path never trains the indexer; the indexer loss trains only the indexer."""
    spec = FAMILY_SPECS["dsa-mla"]
    model = build(spec, torch.float32)
    attn = model.layers[0].attention
    out = model(torch.randint(0, spec.vocab_size, (2, 17)))
    st = out.aux["dsa"][0]
    assert out.aux["layers"][0] is st and st.sparse
    out.logits.sum().backward(retain_graph=True)
    assert all(p.grad is None for p in attn.indexer.parameters())
    model.zero_grad(set_to_none=True)
    st.index_scores.masked_fill(st.indices < 0, 0).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.indexer.parameters())
    others = [p for n, p in model.named_parameters() if ".indexer." not in n]
    assert all(p.grad is None for p in others)


def test_dsa_with_large_topk_is_dense_attention(seed):
    base = make_spec("A", attention={"kind": "mla", "index_topk": 64})
    dsa = make_spec("D", attention={"kind": "mla", "index_topk": 64})
    a, d = build(base), build(dsa)
    d.load_state_dict(a.state_dict(), strict=False)
    ids = torch.randint(0, base.vocab_size, (2, 21))
    torch.testing.assert_close(a(ids).logits, d(ids).logits, atol=1e-10, rtol=0)
    # DSA's dense warm-up stage with a small top-k is dense attention as well
    d2 = make_spec("D", attention={"kind": "mla", "index_topk": 3})
    m = build(d2)
    m.load_state_dict(d.state_dict())
    m.layers[0].attention.sparse = False
    torch.testing.assert_close(a(ids).logits, m(ids).logits, atol=1e-10, rtol=0)
    assert not m(ids).aux["dsa"][0].sparse


def test_gqa_matches_explicit_attention(seed):
    spec = FAMILY_SPECS["gqa"]   # 4 heads, 2 KV heads, QK-norm, half the head dim rotated
    attn = build(spec).layers[0].attention
    b, t = 2, 11
    x = torch.randn(b, t, spec.hidden_size, dtype=D64)
    y, _, _ = attn(x, SeqContext(b, t, x.device))
    H, Hk, hd = attn.heads, attn.kv_heads, attn.head_dim
    rms = lambda v, w: v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + spec.norm.eps) * w
    q = rms(attn.q_proj(x).view(b, t, H, hd), attn.q_norm.weight)
    k = rms(attn.k_proj(x).view(b, t, Hk, hd), attn.k_norm.weight)
    v = attn.v_proj(x).view(b, t, Hk, hd)
    rot = spec.rotary_dim
    assert rot == hd // 2
    inv = 1.0 / spec.attention.rope_theta ** (torch.arange(0, rot, 2, dtype=D64) / rot)
    phi = torch.arange(t, dtype=D64)[:, None] * inv          # (t, rot/2)
    q, k = _rot(q, phi[:, None]), _rot(k, phi[:, None])
    k, v = k.repeat_interleave(H // Hk, 2), v.repeat_interleave(H // Hk, 2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)
    s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(b, t, -1)
    torch.testing.assert_close(y, attn.o_proj(o), atol=1e-10, rtol=1e-9)


def test_norms():
    x = torch.randn(3, 5, 12, dtype=D64)
    n = RMSNorm(12).double()
    with torch.no_grad():
        n.weight.normal_()
    torch.testing.assert_close(n(x), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * n.weight)
    ln = LayerNorm(12).double()
    torch.testing.assert_close(ln(x), F.layer_norm(x, (12,), eps=1e-5))
    z = torch.randn_like(x)
    gn = GatedRMSNorm(12, group_size=4).double()
    g = (x * F.silu(z)).view(3, 5, 3, 4)
    want = (g / torch.sqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(3, 5, 12)
    torch.testing.assert_close(gn(x, z), want)
    gb = GatedRMSNorm(12, norm_before_gate=True).double()
    torch.testing.assert_close(gb(x, z), x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * F.silu(z))
    assert n(x.bfloat16()).dtype == torch.bfloat16


def test_packing_helpers():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 5]])
    assert positions_from_doc_ids(doc).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], list(range(9))]
    v = torch.randn(2, 9, 3)
    cs = segmented_cumsum(v, SeqContext(2, 9, "cpu", doc).starts)
    for r in range(2):
        for s, e in ((0, 3), (3, 5), (5, 9)) if r == 0 else ((0, 9),):
            torch.testing.assert_close(cs[r, s:e], v[r, s:e].double().cumsum(0))
    x = torch.randn(2, 9, 6, dtype=D64)
    w = torch.randn(6, 1, 4, dtype=D64)
    bias = torch.randn(6, dtype=D64)
    packed = causal_conv1d(x, w, bias, SeqContext(2, 9, "cpu", doc))
    for s, e in ((0, 3), (3, 5), (5, 9)):
        alone = causal_conv1d(x[:1, s:e], w, bias, SeqContext(1, e - s, "cpu"))
        torch.testing.assert_close(packed[:1, s:e], alone)
    torch.testing.assert_close(packed[1:], causal_conv1d(x[1:], w, bias, SeqContext(1, 9, "cpu")))


def test_init_follows_published_recipes(seed):
    spec = megacpp.load_recipe("nam-125m").model   # GQA, Mamba-2, MoE, Gated DeltaNet
    model = megacpp.build_model(spec)
    std, depth = spec.init_std, spec.depth
    lay = {l.letter: l for l in model.layers}
    m, r, a, e = lay["M"].mamba, lay["R"].recurrent, lay["A"].attention, lay["E"].moe
    for p in (m.A_log, r.A_log):
        assert p.dtype == torch.float32
        assert p.min() >= 0 and p.max() <= math.log(16) + 1e-6
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= spec.mamba.dt_min * 0.999 and dt.max() <= spec.mamba.dt_max * 1.001
    assert torch.all(m.D == 1) and m.D.dtype == torch.float32
    assert F.softplus(r.dt_bias).max() <= 0.1001
    assert abs(a.q_proj.weight.std().item() - std) < 0.1 * std
    out = std / math.sqrt(2 * depth)
    for w in (a.o_proj.weight, m.out_proj.weight, r.o_proj.weight, e.experts.w_out):
        assert abs(w.std().item() - out) < 0.1 * out
    assert abs(model.embed.weight.std().item() - std) < 0.05 * std
    assert torch.all(model.final_norm.weight == 1) and torch.all(lay["A"].norm.weight == 1)
    m3 = megacpp.build_model(make_spec("M", mamba={"version": 3})).layers[0].mamba
    assert torch.all(m3.B_bias == 1) and torch.all(m3.C_bias == 1)
    assert torch.all(m3.B_norm.weight == 1)


def test_output_object(seed):
    spec = ALL_LETTER_SPECS["ADMREF-layernorm-mtp"]
    model = build(spec, torch.float32)
    ids = torch.randint(0, spec.vocab_size, (2, 15))
    out = model(ids, collect_hidden="final")
    assert out.hidden.shape == (2, 15, spec.hidden_size)
    assert out.logits.shape == (2, 15, spec.vocab_size)
    torch.testing.assert_close(out.logits, out.hidden @ model.head_weight.T)
    assert list(out.collected) == [5]
    torch.testing.assert_close(model.final_norm(out.collected[5]), out.hidden)
    assert len(out.mtp_hidden) == 2 and len(out.mtp_logits) == 2
    assert len(out.aux["moe"]) == 1 + 2 and len(out.aux["dsa"]) == 1   # MTP pattern "ME" has an E
    assert set(out.aux["layers"]) == {1, 4, "mtp.0.1", "mtp.1.1"}
    lean = model(ids, collect_hidden=[0, 3], return_hidden_only=True)
    assert lean.logits is None and lean.mtp_logits is None and sorted(lean.collected) == [0, 3]
    torch.testing.assert_close(lean.hidden, out.hidden)
    with pytest.raises(ValueError):
        model(ids, collect_hidden=[6])


def test_mtp_reads_the_next_tokens(seed):
    spec = make_spec("AF", mtp={"depths": 2, "pattern": "A"})
    model = build(spec)
    ids = torch.randint(0, spec.vocab_size, (1, 12))
    ids2 = ids.clone()
    ids2[0, 7] = (ids[0, 7] + 1) % spec.vocab_size
    a, b = model(ids), model(ids2)
    # depth k at position i embeds token i+k+1: token 7 first reaches depth 0 at 6, depth 1 at 5
    for k, first in ((0, 6), (1, 5)):
        diff = (a.mtp_hidden[k] - b.mtp_hidden[k]).abs().amax(-1)[0]
        assert torch.all(diff[:first] < 1e-12) and diff[first] > 1e-6


def test_bf16_autocast_forward_backward(seed):
    spec = megacpp.load_recipe("nam-tiny").model
    model = megacpp.build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (2, 64))
    doc = (torch.arange(64) >= 40).long().expand(2, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, doc_ids=doc, return_hidden_only=True)
        loss = F.cross_entropy((out.hidden @ model.head_weight.T).float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_dsa_topk_backend_is_swappable(seed):
    """D layers call `indexer_topk_fn`: the plain path is the naive (b, t, t) scorer,
    and the dsa_indexer_fused patch installs the chunked op there."""
    from megacpp.ops.dsa_index.reference import indexer_topk
    spec = FAMILY_SPECS["dsa-gqa"]
    model = build(spec)
    attn = model.layers[0].attention
    assert attn.indexer_topk_fn is indexer_topk_naive
    assert build(FAMILY_SPECS["gqa"]).layers[0].attention.indexer_topk_fn is None
    calls = []

    def chunked(q, k, w, topk, causal=True, doc_ids=None):
        calls.append(topk)
        return indexer_topk(q, k, w, topk, causal=causal, chunk_size=7, doc_ids=doc_ids)

    ids = torch.randint(0, spec.vocab_size, (2, 19))
    doc = (torch.arange(19) >= 8).long().expand(2, 19)
    a = model(ids, doc_ids=doc).logits
    attn.indexer_topk_fn = chunked
    torch.testing.assert_close(model(ids, doc_ids=doc).logits, a, atol=1e-10, rtol=0)
    assert calls == [spec.attention.index_topk]
