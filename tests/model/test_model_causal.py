"""Causality and document isolation, per family and for patterns with every letter.

Checked in float64 so that any leak, however small, stands far above rounding.
"""
from __future__ import annotations

import pytest
import torch

from model_testutil import ALL_LETTER_SPECS, FAMILY_SPECS, build

SPECS = {**FAMILY_SPECS, **ALL_LETTER_SPECS}
T = 29  # several SSD / delta-rule chunks of 8, more keys than DSA's top-5
ATOL = 1e-10


def outputs(model, ids, **kw):
    out = model(ids, **kw)
    parts = [out.hidden, out.logits] + list(out.mtp_hidden)
    return out, parts


@pytest.mark.parametrize("name", list(SPECS))
def test_causal(name, seed):
    spec = SPECS[name]
    model = build(spec)
    ids = torch.randint(0, spec.vocab_size, (3, T))
    p = int(torch.randint(1, T - 2, ()))
    ids2 = ids.clone()
    ids2[:, p + 1:] = torch.randint(0, spec.vocab_size, (3, T - p - 1))
    with torch.no_grad():
        out1, a = outputs(model, ids)
        out2, b = outputs(model, ids2)
    # MTP depth k at position i reads token i+k+1 by design: compare what it may see.
    for j, (x, y) in enumerate(zip(a, b)):
        shift = 0 if j < 2 else j - 1
        upto = p + 1 - shift
        torch.testing.assert_close(x[:, :upto], y[:, :upto], atol=ATOL, rtol=0)
    # the tail does change (the test is not vacuous)
    assert (a[0][:, p + 1:] - b[0][:, p + 1:]).abs().max() > 1e-6


def _docs(spec, b, t):
    ids = torch.randint(0, spec.vocab_size, (b, t))
    doc = torch.zeros(b, t, dtype=torch.long)
    for r in range(b):
        cuts = sorted(torch.randperm(t - 2)[:2].add(1).tolist())
        for c in cuts:
            doc[r, c:] += 1
    return ids, doc


@pytest.mark.parametrize("name", list(SPECS))
def test_documents_isolated(name, seed):
    """Changing one document of a packed row changes no other document's outputs."""
    spec = SPECS[name]
    model = build(spec)
    ids, doc = _docs(spec, 3, T)
    with torch.no_grad():
        _, a = outputs(model, ids, doc_ids=doc)
        for target in range(3):
            ids2 = torch.where(doc == target, torch.randint(0, spec.vocab_size, ids.shape), ids)
            _, b = outputs(model, ids2, doc_ids=doc)
            others = doc != target
            for x, y in zip(a, b):
                torch.testing.assert_close(x[others], y[others], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(SPECS))
def test_packed_equals_alone(name, seed):
    """A document packed after another computes what it computes alone (positions restart)."""
    spec = SPECS[name]
    model = build(spec)
    s = int(torch.randint(3, T - 3, ()))
    ids = torch.randint(0, spec.vocab_size, (2, T))
    doc = (torch.arange(T) >= s).long().expand(2, T)
    with torch.no_grad():
        _, packed = outputs(model, ids, doc_ids=doc)
        _, first = outputs(model, ids[:, :s])
        _, second = outputs(model, ids[:, s:])
    for j, (x, y1, y2) in enumerate(zip(packed, first, second)):
        torch.testing.assert_close(x[:, s:], y2, atol=1e-9, rtol=0)
        # MTP depth k's last k+1 positions of a document have no next token
        n = s - (j - 1) if j >= 2 else s
        torch.testing.assert_close(x[:, :n], y1[:, :n], atol=1e-9, rtol=0)


def test_explicit_positions_match_default(seed):
    spec = SPECS["ADMREF-mamba3-mla"]
    model = build(spec)
    ids, doc = _docs(spec, 2, T)
    from megacpp.model.context import positions_from_doc_ids
    pos = positions_from_doc_ids(doc)
    assert pos[doc != torch.roll(doc, 1, dims=1)].eq(0).all()
    with torch.no_grad():
        a = model(ids, doc_ids=doc).hidden
        b = model(ids, doc_ids=doc, positions=pos).hidden
        shifted = model(ids, doc_ids=doc, positions=pos + 5).hidden
        stretched = model(ids, doc_ids=doc, positions=pos * 2).hidden
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # RoPE sees only relative positions: a shift changes nothing, a stretch does
    torch.testing.assert_close(a, shifted, atol=1e-10, rtol=0)
    assert (a - stretched).abs().max() > 1e-6


def test_no_doc_ids_equals_single_document(seed):
    spec = SPECS["ADMREF-mamba2-gqa"]
    model = build(spec)
    ids = torch.randint(0, spec.vocab_size, (2, T))
    with torch.no_grad():
        a = model(ids).hidden
        b = model(ids, doc_ids=torch.zeros_like(ids)).hidden
    torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
