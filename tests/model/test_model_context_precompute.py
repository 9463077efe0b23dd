"""The context is filled before the first layer: no layer adds a memo key.

Per-block torch.compile guards on the memo's keys, so a key added by a
layer would give later layers of the same family another graph."""
from __future__ import annotations

import pytest
import torch

from megacpp.model import context

from model_testutil import ALL_LETTER_SPECS, build


@pytest.mark.parametrize("name", sorted(ALL_LETTER_SPECS))
@pytest.mark.parametrize("packed", [True, False])
def test_layers_add_no_context_keys(name, packed, monkeypatch, seed):
    seen = {}
    original = context.SeqContext.precompute

    def spy(self, *a, **k):
        original(self, *a, **k)
        seen["after_precompute"] = set(self._memo)
        seen["ctx"] = self

    monkeypatch.setattr(context.SeqContext, "precompute", spy)
    spec = ALL_LETTER_SPECS[name]
    model = build(spec, torch.float32)
    t = 40
    ids = torch.randint(0, spec.vocab_size, (2, t))
    doc = (torch.arange(t) >= 17).long().expand(2, t) if packed else None
    model(ids, doc_ids=doc)
    after = set(seen["ctx"]._memo)
    assert after == seen["after_precompute"], f"layers added {after - seen['after_precompute']}"
    if packed:
        assert "starts" in after and "attn_mask" in after
