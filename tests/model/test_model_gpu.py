"""The model on CUDA: grouped GEMM experts, bf16 autocast training step, decoding,
document isolation. Skipped without a GPU."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import megacpp
from megacpp.model.moe import MoE, grouped_mm_available, moe_reference

from model_testutil import ALL_LETTER_SPECS, make_spec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(autouse=True)
def _exact(exact_fp32):
    # TF32 would blur the float32 comparisons below by ~1e-3 (tests/model/conftest.py)
    yield


@pytest.mark.parametrize("cfg", [{}, {"score": "sigmoid", "bias_balancing": True, "null_experts": 2},
                                 {"capacity_factor": 0.5}, {"routing": "expert_choice", "capacity_factor": 1.0}])
def test_grouped_mm_bf16_matches_loop(cfg, seed):
    spec = make_spec("E", hidden_size=64, moe={"expert_ffn": 128, "num_experts": 8, **cfg})
    moe = MoE(spec).cuda()
    moe.init_weights(0.05, 0.02)
    x = torch.randn(4, 128, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print("grouped_mm available (bf16):", grouped_mm_available(x.device, torch.bfloat16, 64, 256, 128))
        x1 = x.clone().requires_grad_(True)
        y = moe(x1)[0]
    x2 = x.clone().requires_grad_(True)
    y_ref = moe_reference(moe, x2)        # float32 loop
    err = ((y.float() - y_ref).abs().max() / y_ref.abs().max()).item()
    g = torch.randn_like(y_ref)
    gx, gw = torch.autograd.grad(y.float(), (x1, moe.experts.w_in), g)
    rx, rw = torch.autograd.grad(y_ref, (x2, moe.experts.w_in), g)
    gerr = max(((gx - rx).abs().max() / rx.abs().max()).item(),
               ((gw - rw).abs().max() / rw.abs().max()).item())
    print(f"bf16 grouped vs fp32 loop: rel err fwd {err:.2e}, grad {gerr:.2e}")
    assert err < 3e-2 and gerr < 3e-2


def test_dropless_moe_has_no_host_sync(seed):
    """The dropless path (no capacity, no null experts) must not wait on the GPU:
    a sync per MoE layer serialises the CPU and the GPU every layer."""
    spec = make_spec("E", hidden_size=64, moe={"expert_ffn": 128, "num_experts": 8, "score": "sigmoid",
                                               "bias_balancing": True})
    moe = MoE(spec).cuda()
    moe.init_weights(0.05, 0.02)
    x = torch.randn(4, 128, 64, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        moe(x)  # warm-up: the grouped_mm probe may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = moe(x)[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_nam_tiny_cuda_step_and_decode(seed):
    spec = megacpp.load_recipe("nam-tiny").model
    with torch.device("cuda"):
        model = megacpp.build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (8, 256), device="cuda")
    doc = (torch.arange(256, device="cuda") >= 100).long().expand(8, 256)
    for i in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(ids, doc_ids=doc, return_hidden_only=True)
            loss = F.cross_entropy(F.linear(out.hidden, model.head_weight).float().flatten(0, 1), ids.flatten())
        loss.backward()
        torch.cuda.synchronize()
        print(f"nam-tiny bf16 fwd+bwd on {torch.cuda.get_device_name()}: {time.perf_counter() - t0:.3f} s")
    assert torch.isfinite(loss)
    model.zero_grad(set_to_none=True)
    ids = torch.randint(0, spec.vocab_size, (2, 48), device="cuda")
    with torch.no_grad():
        full = model(ids).logits
        logits, cache = model.prefill(ids[:, :20])
        worst = (logits - full[:, 19]).abs().max().item()
        for i in range(20, 48):
            worst = max(worst, (model.step(ids[:, i], cache) - full[:, i]).abs().max().item())
    print(f"decode max |logit diff| {worst:.2e}")
    assert worst < 1e-4


@pytest.mark.parametrize("name", list(ALL_LETTER_SPECS))
def test_documents_isolated_cuda(name, seed):
    spec = ALL_LETTER_SPECS[name]
    with torch.device("cuda"):
        model = megacpp.build_model(spec)
    ids = torch.randint(0, spec.vocab_size, (2, 40), device="cuda")
    doc = (torch.arange(40, device="cuda") >= 17).long().expand(2, 40)
    with torch.no_grad():
        packed = model(ids, doc_ids=doc).logits
        alone = model(ids[:, 17:]).logits
        ids2 = ids.clone()
        ids2[:, :17] = torch.randint(0, spec.vocab_size, (2, 17), device="cuda")
        packed2 = model(ids2, doc_ids=doc).logits
    torch.testing.assert_close(packed[:, 17:], alone, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 17:], packed2[:, 17:], atol=2e-5, rtol=1e-5)
