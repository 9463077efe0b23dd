"""model/projections: several projections of one input as one GEMM, equal to
the modules run one by one (outputs and gradients), and the cases it leaves alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import megacpp
from megacpp.model.context import SeqContext
from megacpp.model.projections import fusable, fusion_enabled, project


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
            self.n += 1
        return func(*args, **(kwargs or {}))


def _linears(gen, widths=(24, 8, 8, 3), d=16, dtype=torch.float64):
    mods = [nn.Linear(d, w, bias=False, dtype=dtype) for w in widths]
    for m in mods:
        with torch.no_grad():
            m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=dtype))
    return mods


def test_one_gemm_equals_the_modules_forward_and_backward(seed, gen, monkeypatch):
    monkeypatch.setenv("MEGACPP_FUSED_PROJECTIONS", "1")
    mods = _linears(gen)
    x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
    gos = [torch.randn(2, 5, m.out_features, generator=gen, dtype=torch.float64) for m in mods]
    grads = []
    for fused in (True, False):
        xs = x.clone().requires_grad_(True)
        for m in mods:
            m.weight.grad = None
        with _CountMatmuls() as cm:
            outs = project(xs, *mods) if fused else tuple(m(xs) for m in mods)
        assert cm.n == (1 if fused else len(mods))
        sum((o * g).sum() for o, g in zip(outs, gos)).backward()
        grads.append([o.detach() for o in outs] + [xs.grad] + [m.weight.grad.clone() for m in mods])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_fusion_is_off_unless_asked(seed, gen, monkeypatch):
    """Off by default (no gain measured on an H200, BENCHMARKS.md): one GEMM per module."""
    monkeypatch.delenv("MEGACPP_FUSED_PROJECTIONS", raising=False)
    assert not fusion_enabled()
    mods = _linears(gen)
    with _CountMatmuls() as cm:
        project(torch.randn(3, 16, generator=gen, dtype=torch.float64), *mods)
    assert cm.n == len(mods)


def test_what_is_left_alone(seed, gen, monkeypatch):
    monkeypatch.setenv("MEGACPP_FUSED_PROJECTIONS", "1")
    mods = _linears(gen)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)

    class Special(nn.Linear):  # e.g. Float8Linear, the NVFP4 emulation: their own forward must run
        calls = 0

        def forward(self, inp):
            Special.calls += 1
            return super().forward(inp)

    special = Special(16, 4, bias=False, dtype=torch.float64)
    assert fusable(mods) and not fusable(mods[:1]) and not fusable(mods + [special])
    assert not fusable([nn.Linear(16, 4, bias=True), nn.Linear(16, 4, bias=False)])
    assert not fusable([nn.Linear(16, 4, bias=False), nn.Linear(8, 4, bias=False)])
    outs = project(x, mods[0], special)
    assert Special.calls == 1 and torch.equal(outs[1], special(x))
    monkeypatch.setenv("MEGACPP_FUSED_PROJECTIONS", "0")
    assert not fusion_enabled()
    with _CountMatmuls() as cm:
        project(x, *mods)
    assert cm.n == len(mods)
    monkeypatch.setenv("MEGACPP_FUSED_PROJECTIONS", "yes")
    with pytest.raises(ValueError, match="expected 0 or 1"):
        project(x, *mods)


@pytest.mark.parametrize("letter", ["A", "R"])
def test_layers_equal_with_and_without_fusion(letter, seed, monkeypatch):
    """nam-tiny's attention (GQA here) and Gated DeltaNet layers in float64: the
    same outputs and gradients whether their input projections run fused or not."""
    recipe = megacpp.load_recipe("nam-tiny", ["model.attention.kind=gqa", "model.attention.num_kv_heads=2"])
    torch.manual_seed(seed)
    model = megacpp.build_model(recipe.model).double()
    layer = model.layers[recipe.layers.letters.index(letter)]
    b, t, d = 2, 12, recipe.model.hidden_size
    ctx = SeqContext(b, t, torch.device("cpu"), None, None)
    model._precompute_context(ctx)
    x = torch.randn(b, t, d, dtype=torch.float64)
    res = []
    for flag in ("1", "0"):
        monkeypatch.setenv("MEGACPP_FUSED_PROJECTIONS", flag)
        layer.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        y, _, _ = layer(xs, ctx)
        y.square().sum().backward()
        res.append([y.detach(), xs.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
    assert len(res[0]) == len(res[1]) > 2
    for a, b_ in zip(*res):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


def test_mamba_in_proj_split_equals_one_gemm(seed):
    """policy.kernels.mamba_in_proj: the Mamba-2 layer with its in_proj as three
    GEMMs over the weight's row slices equals the one-GEMM layer in float64,
    outputs and every gradient, on fresh random inputs; and it does run three."""
    from megacpp.model.mamba import Mamba2
    from megacpp.train.activation import apply_mamba_in_proj

    recipe = megacpp.load_recipe("nam-tiny", ["model.mamba.version=2"])
    torch.manual_seed(seed)
    model = megacpp.build_model(recipe.model).double()
    layer = model.layers[recipe.layers.letters.index("M")]
    assert isinstance(layer.mixer, Mamba2)
    b, t, d = 2, 24, recipe.model.hidden_size
    ctx = SeqContext(b, t, torch.device("cpu"), None, None)
    model._precompute_context(ctx)
    x = torch.randn(b, t, d, dtype=torch.float64)
    res, mms = [], []
    for mode in ("split", "one"):
        assert apply_mamba_in_proj(model, mode) == (recipe.layers.letters.count("M") if mode == "split" else 0)
        layer.zero_grad(set_to_none=True)
        xs = x.clone().requires_grad_(True)
        with _CountMatmuls() as cm:
            y, _, _ = layer(xs, ctx)
        mms.append(cm.n)
        (y * torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))).sum().backward()
        res.append([y.detach(), xs.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
    assert mms[0] == mms[1] + 2            # three in_proj GEMMs instead of one
    assert len(res[0]) == len(res[1]) > 5  # in_proj, conv, A_log, D, dt_bias, norm, out_proj
    for a, b_ in zip(*res):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="'one' or 'split'"):
        apply_mamba_in_proj(model, "three")


def test_mamba_in_proj_split_leaves_a_converted_in_proj_alone():
    """An in_proj that is not a plain nn.Linear (FP8 / NVFP4 conversion) keeps
    its own forward: the split is not applied and not counted."""
    from megacpp.model.mamba import Mamba2
    from megacpp.train.activation import apply_mamba_in_proj

    class _Converted(nn.Linear):
        pass

    recipe = megacpp.load_recipe("nam-tiny", ["model.mamba.version=2"])
    model = megacpp.build_model(recipe.model)
    mixers = [m for m in model.modules() if isinstance(m, Mamba2)]
    old = mixers[0].in_proj
    mixers[0].in_proj = _Converted(old.in_features, old.out_features, bias=False)
    assert apply_mamba_in_proj(model, "split") == len(mixers) - 1
    assert not mixers[0].split_in_proj and all(m.split_in_proj for m in mixers[1:])
