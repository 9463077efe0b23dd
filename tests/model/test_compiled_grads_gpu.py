"""Compiled blocks on CUDA give eager's loss and every gradient (bf16 autocast).

Dynamo traces some code differently on CUDA than on CPU: in the fourth
session the emulated NVFP4 linear, then an autograd.Function, got a zero
gradient in place of the real one under torch.compile on an H200 while its
forward stayed exact, and every CPU test passed. These tests compile each
block as the trainer does and compare the loss and every parameter's
gradient with eager, on a hybrid of all four families, plain and with every
block linear emulated in NVFP4. Skipped without a GPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import megacpp
from megacpp.train.lowp import NVFP4EmulatedLinear

from model_testutil import make_spec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _to_nvfp4(model: nn.Module) -> int:
    n = 0
    for layer in model.layers:
        for name, mod in list(layer.named_modules()):
            if type(mod) is nn.Linear and mod.in_features % 16 == 0:
                parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
                setattr(parent, name.rpartition(".")[2], NVFP4EmulatedLinear.from_linear(mod))
                n += 1
    return n


def _by_module(names) -> dict[str, list[str]]:
    """Parameter names grouped by top-level module: embed, layers.<i>, final_norm, head."""
    groups: dict[str, list[str]] = {}
    for n in names:
        key = ".".join(n.split(".")[:2]) if n.startswith("layers.") else n.split(".")[0]
        groups.setdefault(key, []).append(n)
    return groups


def _loss_and_grads(model, ids, doc, bf16: bool = True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(ids, doc_ids=doc, return_hidden_only=True)
        logits = F.linear(out.hidden, model.head_weight).float()
    loss = F.cross_entropy(logits.flatten(0, 1)[:-1], ids.flatten()[1:])
    loss.backward()
    return loss.detach(), {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("precision", ["bf16", "nvfp4_emulated"])
def test_compiled_blocks_match_eager_on_cuda(precision, seed, exact_fp32):
    spec = make_spec("AMER", hidden_size=64, ffn_size=128)
    with torch.device("cuda"):
        eager = megacpp.build_model(spec)
    if precision == "nvfp4_emulated":
        assert _to_nvfp4(eager) > 0
    compiled = copy.deepcopy(eager)
    reference = copy.deepcopy(eager)   # float32, no autocast: the truth both bf16 runs approximate
    for layer in compiled.layers:
        layer.compile()
    ids = torch.randint(0, spec.vocab_size, (4, 128), device="cuda")
    doc = (torch.arange(128, device="cuda") >= 50).long().expand(4, 128)
    loss_e, grads_e = _loss_and_grads(eager, ids, doc)
    loss_c, grads_c = _loss_and_grads(compiled, ids, doc)
    assert abs(float(loss_c) - float(loss_e)) < 2e-2 * abs(float(loss_e))
    assert grads_c.keys() == grads_e.keys()
    if precision == "bf16":
        # Compiled and eager bf16 round at different places, so each is measured
        # against float32. Per layer, compiled may be no more than twice as far
        # from it as eager (plus 1%). Per parameter only the direction is held
        # (cosine > 0.5): the recurrent layer's A_log and dt_bias gradients, sums
        # of many cancelling terms, are 20-55% off float32 in bf16 even eagerly
        # (CPU), so a tight per-scalar bound would fail on rounding alone; a
        # zeroed or garbage gradient still fails.
        _, grads_r = _loss_and_grads(reference, ids, doc, bf16=False)
        bad = {}
        for key, names in _by_module(grads_r).items():
            cat = lambda g: torch.cat([g[n].flatten() for n in names])  # noqa: E731
            gr = cat(grads_r)
            err_e = float((cat(grads_e) - gr).norm() / gr.norm().clamp_min(1e-12))
            err_c = float((cat(grads_c) - gr).norm() / gr.norm().clamp_min(1e-12))
            if err_c > 2 * err_e + 1e-2:
                bad[key] = ("error vs float32, compiled / eager", round(err_c, 3), round(err_e, 3))
        for n, gr in grads_r.items():
            cos = float(F.cosine_similarity(grads_c[n].flatten(), gr.flatten(), dim=0))
            if cos < 0.5:
                bad[n] = ("cosine with float32", round(cos, 3))
        assert not bad, f"compiled bf16 gradients: {bad}"
        return
    # FP4 rounding is discontinuous: compile's last-bit differences in a block's
    # input flip some codes, so gradients legitimately differ by tens of percent
    # (CPU: ~40%). Per top-level module, the compiled gradient must still point
    # the same way at about the same size; a zeroed gradient fails both.
    bad = {}
    for key, names in _by_module(grads_e).items():
        ge = torch.cat([grads_e[n].flatten() for n in names])
        gc = torch.cat([grads_c[n].flatten() for n in names])
        cos = float(F.cosine_similarity(gc, ge, dim=0))
        ratio = float(gc.norm() / ge.norm().clamp_min(1e-12))
        if cos < 0.5 or not 0.5 < ratio < 2.0:
            bad[key] = (round(cos, 3), round(ratio, 3))
    assert not bad, f"compiled NVFP4 gradients (cosine, norm ratio) vs eager: {bad}"
