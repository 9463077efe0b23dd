"""Precision on CUDA: FP8 (torchao) against bf16, NVFP4 emulation against the
reference on the GPU, fp16 loss scaling with real fp16 autocast. Skipped
without a GPU (FP8 also without compute capability 8.9 or torchao)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import megacpp
from megacpp.train.lowp.fp8 import fp8_unavailable
from megacpp.train.lowp.nvfp4 import nvfp4_linear, nvfp4_qdq, nvfp4_quantize
from megacpp.train.lowp.reference import nvfp4_reference
from megacpp.train.precision import Precision

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def _recipe(**sets):
    base = {"model.hidden_size": 256, "model.ffn_size": 1024, "model.moe.expert_ffn": 256,
            "model.moe.shared_ffn": 256, "policy.precision.compute": "bf16"}
    base.update(sets)
    return megacpp.load_recipe("nam-tiny", [f"{k}={v}" for k, v in base.items()])


def _loss_and_grads(model, ids):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                         if p.grad is not None}


@pytest.mark.parametrize("lp", ["fp8_rowwise", "fp8_tensorwise"])
def test_fp8_model_matches_bf16_loosely(lp):
    why = fp8_unavailable(CUDA)
    if why:
        pytest.skip(why)
    recipe = _recipe(**{"policy.precision.low_precision": lp})
    torch.manual_seed(0)
    ref = megacpp.build_model(recipe.model).to(CUDA)
    fp8 = copy.deepcopy(ref)
    prec = Precision(recipe.policy.precision, CUDA)
    prec.apply(fp8)
    converted = prec.lowp.converted
    assert converted and all(type(fp8.get_submodule(n)).__name__ == "Float8Linear" for n in converted)
    ids = torch.randint(0, recipe.model.vocab_size, (4, 257), device="cuda")
    l0, y0, g0 = _loss_and_grads(ref, ids)
    l1, y1, g1 = _loss_and_grads(fp8, ids)
    print(f"{lp}: loss bf16 {float(l0):.5f} fp8 {float(l1):.5f}; converted {len(converted)}")
    assert torch.isfinite(l1) and abs(float(l1 - l0)) < 0.02 * float(l0)
    assert float((y1 - y0).norm() / y0.norm()) < 0.1
    for n in converted:
        a, b = g0[n + ".weight"], g1[n + ".weight"]
        assert F.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9, n


def test_nvfp4_on_cuda_equals_the_reference():
    x = torch.randn(16, 128) * torch.logspace(-6, 2, 16)[:, None]
    t = nvfp4_quantize(x.cuda())
    q, codes, g, deq = nvfp4_reference(x)
    assert torch.equal(t.scale.view(torch.uint8).cpu(), codes)
    assert torch.equal(t.q.cpu().view(torch.int32), q.view(torch.int32))
    assert torch.equal(t.dequantize().cpu().view(torch.int32), deq.view(torch.int32))


def test_nvfp4_linear_on_cuda_bf16():
    x = torch.randn(64, 256, device="cuda")
    w = torch.randn(128, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = nvfp4_linear(x, w)
    ref = F.linear(nvfp4_qdq(x).double(), nvfp4_qdq(w.detach()).double())
    assert y.dtype == torch.bfloat16
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    y.float().sum().backward()
    assert torch.isfinite(w.grad).all()


def test_fp16_overflow_is_skipped_on_cuda():
    spec = dataclasses.replace(_recipe().policy.precision, compute="fp16", loss_scale_init=1024.0,
                               loss_scale_growth_interval=2)
    p = Precision(spec, CUDA)
    lin = torch.nn.Linear(64, 64).cuda()
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2, fused=True)
    x = torch.randn(8, 64, device="cuda")
    for i, big in enumerate([False, True, False, False]):
        before = lin.weight.detach().clone()
        with p.autocast():
            loss = lin(x).float().pow(2).mean() * (1e30 if big else 1.0)
        p.scale(loss).backward()
        p.unscale_([opt])
        stepped = p.step([opt])
        opt.zero_grad()
        assert stepped is (not big), i
        assert torch.equal(before, lin.weight) is big, i
    assert p.scaler.get_scale() == 1024.0  # halved at step 1, doubled after 2 clean steps
