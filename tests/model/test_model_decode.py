"""Incremental decoding (prefill + step) equals the full forward, float32."""
from __future__ import annotations

import pytest
import torch

import megacpp

from model_testutil import ALL_LETTER_SPECS, FAMILY_SPECS, build

T = 27
TOL = 1e-4


def check_decode(model, vocab, b=2, t=T, prompt=None):
    ids = torch.randint(0, vocab, (b, t))
    prompt = prompt if prompt is not None else int(torch.randint(1, t - 4, ()))
    with torch.no_grad():
        full = model(ids).logits
        logits, cache = model.prefill(ids[:, :prompt])
        worst = (logits - full[:, prompt - 1]).abs().max().item()
        for i in range(prompt, t):
            logits = model.step(ids[:, i], cache)
            worst = max(worst, (logits - full[:, i]).abs().max().item())
    assert cache.length == t
    print(f"max |logit diff| = {worst:.2e} (prompt {prompt} of {t})")
    assert worst < TOL
    return worst


@pytest.mark.parametrize("name", list(FAMILY_SPECS) + list(ALL_LETTER_SPECS))
def test_decode_matches_forward(name, seed):
    spec = {**FAMILY_SPECS, **ALL_LETTER_SPECS}[name]
    check_decode(build(spec, torch.float32), spec.vocab_size)


def test_decode_from_one_token_prompt(seed):
    spec = ALL_LETTER_SPECS["ADMREF-mamba3-mla"]
    check_decode(build(spec, torch.float32), spec.vocab_size, prompt=1)


def test_decode_nam_tiny(seed):
    spec = megacpp.load_recipe("nam-tiny").model
    model = megacpp.build_model(spec).eval()
    check_decode(model, spec.vocab_size, b=2, t=40)


def test_decode_dense_stage_dsa(seed):
    """DSA's dense warm-up stage decodes over all keys, like its forward."""
    spec = FAMILY_SPECS["dsa-mla"]
    model = build(spec, torch.float32)
    model.layers[0].attention.sparse = False
    check_decode(model, spec.vocab_size)


def test_cache_holds_mla_latent_not_keys(seed):
    spec = FAMILY_SPECS["mla"]
    model = build(spec, torch.float32)
    _, cache = model.prefill(torch.randint(0, spec.vocab_size, (2, 9)))
    c_kv, k_pe = cache.layers[0].pieces
    a = spec.attention
    assert c_kv.shape == (2, 9, a.kv_lora_rank) and k_pe.shape == (2, 9, a.qk_rope_dim)
