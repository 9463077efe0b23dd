"""`megacpp bench` on CPU: the synthetic default and real batches from a snapshot."""
from __future__ import annotations

import json

import pytest
import torch

import megacpp
from megacpp.data.loader import open_snapshot
from megacpp.errors import MegacppError
from megacpp.train.bench import run_bench

from train_testutil import tiny_sets


def test_bench_synthetic_and_snapshot_batches(tiny_snapshot):
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets())
    syn = run_bench(recipe, steps=2, warmup=1, device="cpu", family_times=False)
    real = run_bench(recipe, steps=2, warmup=1, device="cpu", family_times=False, data=str(tiny_snapshot))
    assert syn.data == "synthetic"
    assert real.data == open_snapshot(tiny_snapshot).snapshot_id
    for r in (syn, real):
        assert r.tokens_per_s > 0 and len(r.step_ms_all) == 2
        assert r.ssd_backend == "reference" and r.conv_backend == "reference"  # no CUDA here
        assert (r.delta_rule_backend, r.attention_backend) == ("reference", "sdpa")
        assert r.gated_norm_backend == "reference"
        assert r.grad_sum == "autograd" and r.moe_wgrad_splits == 1   # no CUDA graphs; nam-tiny's policy
        json.dumps(r.to_dict())  # --json output stays serialisable


def test_bench_refuses_snapshot_of_another_seq_len(tiny_snapshot):
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.seq_len": 32}))
    with pytest.raises(MegacppError, match="seq_len"):
        run_bench(recipe, steps=1, warmup=0, device="cpu", family_times=False, data=str(tiny_snapshot))


@pytest.mark.parametrize("mode", ["none", "reduce-overhead"])
def test_bench_family_times_under_cuda_graphs_compile_each_layer_alone(mode, monkeypatch):
    """Under CUDA graphs one layer called alone would replay over its own saved
    tensors: each family's layer forward is compiled by itself in inductor's
    default mode instead, and the note says so. Both compiles are stubbed out
    (the decision is the policy's, not the device's; a layer's forward under
    torch.compile is covered by the per-layer and whole-model compile tests,
    and a cold inductor compile of two layers costs ~45 s of this suite)."""
    import megacpp.train.bench as bench
    monkeypatch.setattr(bench, "apply_compile", lambda model, pol, *a: {"mode": pol.mode})
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append((fn, kw)) or fn)
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.compile.mode": mode, "model.depth": 2,
                                                          "model.pattern": "AM"}))
    r = run_bench(recipe, steps=1, warmup=0, device="cpu", family_times=True, kernels=False)
    assert set(r.family_ms) == {"attention", "mamba"} and all(v > 0 for v in r.family_ms.values())
    if mode == "none":
        assert not r.family_note and compiled == []
    else:
        # each layer's own forward (not its module call), in inductor's default mode (no mode=)
        assert [(getattr(f, "__name__", ""), kw) for f, kw in compiled] == [("forward", {})] * 2
        assert "compiled alone" in r.family_note and "reduce-overhead" in r.family_note
        assert "per family: each family's layer compiled alone" in bench.bench_text(r)


def test_bench_family_probe_follows_the_step_compile():
    from megacpp.train.bench import family_probe
    assert family_probe({"mode": "none"}) == "as built"
    assert family_probe({"mode": "default", "scope": "block"}) == "as built"
    assert family_probe({"mode": "default", "scope": "model"}) == "compiled alone"
    assert family_probe({"mode": "reduce-overhead", "scope": "block"}) == "compiled alone"
    assert family_probe({"mode": "reduce-overhead", "scope": "model"}) == "compiled alone"


def test_bench_family_that_fails_is_named_and_the_rest_stand(monkeypatch):
    """A probe that fails to compile or run leaves its family out, named in the
    note; the other families and the step's results are kept."""
    import megacpp.train.bench as bench
    monkeypatch.setattr(bench, "apply_compile", lambda model, pol, *a: {"mode": "reduce-overhead"})
    calls = []

    def fake_compile(fn, **kw):
        calls.append(fn)
        if len(calls) == 2:
            def broken(*a, **k):
                raise RuntimeError("inductor said no\nsecond line")
            return broken
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"model.depth": 2, "model.pattern": "AM"}))
    r = run_bench(recipe, steps=1, warmup=0, device="cpu", family_times=True, kernels=False)
    assert set(r.family_ms) == {"attention"} and r.tokens_per_s > 0
    assert "mamba (M) not timed: RuntimeError: inductor said no" in r.family_note
    assert "second line" not in r.family_note


@pytest.mark.parametrize("accum,want", [(3, 3), (0, None)])
def test_bench_accumulates_micro_batches_before_one_optimizer_step(accum, want, monkeypatch):
    """accum micro-batches forward and backward, then one optimizer step; tokens
    per step count every micro-batch; 0 takes the recipe's global / micro batch."""
    import megacpp.train.bench as bench_mod
    from megacpp.train.precision import Precision

    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.global_batch": 16, "policy.micro_batch": 4}))
    want = want or 16 // 4
    calls = {"fwd": 0, "opt": 0}
    real_build = megacpp.build_model

    def counting_build(spec):
        m = real_build(spec)
        m.register_forward_pre_hook(lambda *a: calls.__setitem__("fwd", calls["fwd"] + 1))
        return m

    real_step = Precision.step
    monkeypatch.setattr(megacpp, "build_model", counting_build)
    monkeypatch.setattr(Precision, "step", lambda self, o: calls.__setitem__("opt", calls["opt"] + 1)
                        or real_step(self, o))
    r = bench_mod.run_bench(recipe, steps=2, warmup=1, device="cpu", family_times=False, kernels=False,
                            accum=accum)
    assert r.grad_accumulation == want
    assert calls == {"fwd": 3 * want, "opt": 3}
    med_s = r.step_ms_median / 1e3
    assert r.tokens_per_s == pytest.approx(want * 4 * recipe.policy.seq_len / med_s)
    assert f"x {want} micro-batches a step" in bench_mod.bench_text(r)
    with pytest.raises(ValueError, match="accum must be >= 0"):
        bench_mod.run_bench(recipe, steps=1, warmup=0, device="cpu", family_times=False, accum=-1)
    with pytest.raises(ValueError, match="top_kernels must be >= 1"):
        bench_mod.run_bench(recipe, steps=1, warmup=0, device="cpu", family_times=False, top_kernels=0)


def test_compile_mode_auto_resolves_by_device_and_sharding():
    """"auto": CUDA graphs on one CUDA device, inductor's default under DDP/FSDP2
    and off CUDA; every other mode is itself."""
    import torch

    from megacpp.train.compile import resolve_mode
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_mode("auto", cuda, "none") == "reduce-overhead"
    assert resolve_mode("auto", cuda, "fsdp2") == resolve_mode("auto", cuda, "ddp") == "default"
    assert resolve_mode("auto", cpu, "none") == resolve_mode("auto", None) == "default"
    for m in ("none", "default", "reduce-overhead", "max-autotune"):
        assert resolve_mode(m, cuda, "fsdp2") == m


def test_compile_scope_auto_resolves_by_device_and_sharding():
    """scope "auto": one graph for the model on one CUDA device, a graph per
    layer under DDP/FSDP2 and off CUDA; "block" and "model" are themselves.
    apply_compile compiles what it resolved and names the request."""
    import torch

    from megacpp.recipe.policy import CompileSpec
    from megacpp.train.compile import apply_compile, resolve_scope
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_scope("auto", cuda, "none") == "model"
    assert resolve_scope("auto", cuda, "ddp") == resolve_scope("auto", cuda, "fsdp2") == "block"
    assert resolve_scope("auto", cpu, "none") == resolve_scope("auto", None) == "block"
    for s in ("block", "model"):
        assert resolve_scope(s, cuda, "fsdp2") == resolve_scope(s, cpu) == s
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    info = apply_compile(model, CompileSpec(mode="default", scope="auto"), cpu)
    assert info["scope"] == "block" and info["targets"] == 2 and info["requested_scope"] == "auto"
    info = apply_compile(model, CompileSpec(mode="default", scope="block"), cpu)
    assert "requested_scope" not in info


def test_compile_tune_kernels_sets_inductor_and_is_recorded():
    """policy.compile.tune_kernels turns on inductor's coordinate-descent tuning
    before compiling and says so in the compile record; off, nothing is touched;
    with compile off there is nothing to tune."""
    import torch
    import torch._inductor.config as icfg

    from megacpp.recipe.policy import CompileSpec
    from megacpp.train.compile import apply_compile

    # inductor's own patch restores the flag afterwards (monkeypatch's undo
    # left the config module without the attribute)
    with icfg.patch(coordinate_descent_tuning=False):
        model = torch.nn.Module()
        model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
        info = apply_compile(model, CompileSpec(mode="default"), torch.device("cpu"))
        assert "tune_kernels" not in info and icfg.coordinate_descent_tuning is False
        info = apply_compile(model, CompileSpec(mode="none", tune_kernels=True), torch.device("cpu"))
        assert info == {"mode": "none", "targets": 0} and icfg.coordinate_descent_tuning is False
        info = apply_compile(model, CompileSpec(mode="default", tune_kernels=True), torch.device("cpu"))
        assert info["tune_kernels"] is True and icfg.coordinate_descent_tuning is True
        x = torch.randn(2, 4)
        lin = model.layers[0]
        torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)


def test_compile_pdl_and_combo_kernels_are_recorded():
    """policy.compile.pdl is applied only where PDL can run: on the CPU the
    compile record says why it was not, and inductor's switch stays off;
    combo_kernels turns on inductor's combo kernels and says so."""
    import torch
    import torch._inductor.config as icfg

    from megacpp.recipe.policy import CompileSpec
    from megacpp.train.compile import apply_compile

    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])
    with icfg.patch({"combo_kernels": False, "triton.enable_pdl": False}):
        info = apply_compile(model, CompileSpec(mode="default"), torch.device("cpu"))
        assert "pdl" not in info and "combo_kernels" not in info
        info = apply_compile(model, CompileSpec(mode="default", pdl=True, combo_kernels=True),
                             torch.device("cpu"))
        assert isinstance(info["pdl"], str) and info["pdl"].startswith("not applied")
        assert "CUDA" in info["pdl"]
        assert icfg.triton.enable_pdl is False
        assert info["combo_kernels"] is True and icfg.combo_kernels is True
        info = apply_compile(model, CompileSpec(mode="none", pdl=True), torch.device("cpu"))
        assert info == {"mode": "none", "targets": 0}


def test_bench_records_what_auto_compiled_to(monkeypatch):
    """On CPU "auto" compiles in inductor's default mode: the result says so and
    names the request; the families are timed (no CUDA graphs)."""
    import torch._dynamo

    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.compile.mode": "auto", "model.depth": 2,
                                                          "model.pattern": "AM"}))
    torch._dynamo.reset()
    r = run_bench(recipe, steps=1, warmup=1, device="cpu", family_times=True, kernels=False)
    assert r.compile["mode"] == "default" and r.compile["requested"] == "auto"
    assert r.family_ms and not r.family_note
