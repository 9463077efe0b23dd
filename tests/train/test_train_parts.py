"""Training parts on their own: activation checkpointing, schedules, gates, optimizer groups."""
from __future__ import annotations

import math

import pytest
import torch

import megacpp
from megacpp import load_recipe
from megacpp.losses.gates import Gate
from megacpp.train.activation import apply_activation_checkpointing
from megacpp.train.bench import synthetic_batch
from megacpp.train.optim import param_groups
from megacpp.train.schedule import lr_at
from megacpp.train.trainer import lm_loss, mtp_targets

from train_testutil import tiny_sets


def _loss_and_grads(model, batch):
    out = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"],
                return_hidden_only=True)
    loss = lm_loss(model, out.hidden, batch["labels"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_function(mode):
    recipe = load_recipe("nam-tiny", tiny_sets(**{"model.pattern": "ADMREF", "model.depth": 6}))
    torch.manual_seed(0)
    ref = megacpp.build_model(recipe.model)
    ac = megacpp.build_model(recipe.model)
    ac.load_state_dict(ref.state_dict())
    applied = apply_activation_checkpointing(ac, recipe.layers.letters, dict.fromkeys("AMREF", mode))
    assert applied == {i: mode for i in range(6)}
    # state-dict keys are unchanged by the wrapping
    assert list(ac.state_dict()) == list(ref.state_dict())
    batch = synthetic_batch(recipe.model.vocab_size, 2, 64, torch.device("cpu"), mean_doc=20, seed=1)
    l0, g0 = _loss_and_grads(ref, batch)
    l1, g1 = _loss_and_grads(ac, batch)
    assert torch.allclose(l0, l1, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-6), n


def test_schedules():
    kw = dict(total=100, base_lr=1.0, warmup=10, min_ratio=0.1, decay_fraction=0.2)
    cos = [lr_at(s, kind="cosine", **kw) for s in range(100)]
    assert cos[0] == pytest.approx(0.1) and cos[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[10:], cos[11:]))
    assert cos[-1] == pytest.approx(0.1, abs=1e-3)
    wsd = [lr_at(s, kind="wsd", **kw) for s in range(100)]
    assert wsd[50] == 1.0 and wsd[79] == 1.0 and wsd[99] == pytest.approx(0.1)
    assert [lr_at(s, kind="constant", **kw) for s in (20, 99)] == [1.0, 1.0]


def test_gate_schedule():
    g = Gate("stp", True, 0.05, start_step=10, warmup_steps=4)
    assert [g.weight_at(s) for s in (0, 9)] == [0.0, 0.0]
    assert g.weight_at(10) == pytest.approx(0.0125) and g.weight_at(13) == pytest.approx(0.05)
    assert g.weight_at(100) == 0.05
    g.mark(9)
    assert g.first_active_step is None
    g.mark(11)
    g.mark(12)
    assert g.first_active_step == 11
    off = Gate("mtp", False, 1.0, 0, 0)
    assert off.weight_at(5) == 0.0


def test_param_groups_no_decay_on_norms_scalars_embeddings():
    model = megacpp.build_model(load_recipe("nam-tiny").model)
    groups, muon, report = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    names = {n: id(p) in decay for n, p in model.named_parameters()}
    assert not names["embed.weight"]
    assert not any(v for n, v in names.items() if n.endswith(("A_log", ".D", "dt_bias")) or "norm" in n)
    assert names["layers.0.attention.o_proj.weight"] and names["head.weight"]
    _, muon, rep = param_groups(model, 0.1, muon=True)
    assert rep["muon"] > 0 and all(p.ndim == 2 for p in muon)


def test_mtp_targets_shift_and_document_mask():
    labels = torch.tensor([[10, 11, 12, 13, 14, -100]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    t = mtp_targets(labels, docs, 0)
    # depth 0 predicts labels[i+1] when i+1 is in i's document
    assert t.tolist() == [[11, 12, -100, 14, -100, -100]]
    assert not math.isnan(float(t.float().sum()))


def test_compile_stats_counts_recompiles_with_reasons():
    """Recompiles come from dynamo's compile metrics; a grad-mode flip and a
    new size each add one, named by its first failed guard."""
    from torch._dynamo.utils import clear_compilation_metrics

    from megacpp.train.compile import compile_stats

    # earlier tests' compiles in this process would crowd the reasons' top 8
    clear_compilation_metrics()
    before = compile_stats()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    f(torch.ones(3))
    f(torch.ones(3))  # cache hit: no recompile
    with torch.no_grad():
        f(torch.ones(3, requires_grad=True))
    after = compile_stats()
    assert after["recompiles"] - before["recompiles"] == 1
    assert any("grad_mode" in why for why in after["recompile_reasons"])


def _tiny_model_and_batches(n: int):
    import megacpp
    recipe = megacpp.load_recipe("nam-tiny", ["model.vocab_size=64"])
    model = megacpp.build_model(recipe.model)
    ids = [torch.randint(0, 64, (2, 16)) for _ in range(n)]
    return model, ids


def _loss(model, ids):
    out = model(ids)
    logits = out.logits if hasattr(out, "logits") else out
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


def test_grad_accumulator_sums_micro_batches_as_autograd_does(seed, monkeypatch):
    """train.grads.GradAccumulator (one foreach copy, then adds) against autograd's
    own accumulation into kept zero .grads, over two steps of three micro-batches:
    bit-equal, a new step starts its own sum, and a parameter no micro-batch
    reaches ends at zero."""
    from megacpp.train.grads import GradAccumulator

    model, ids = _tiny_model_and_batches(3)
    unused = torch.nn.Parameter(torch.randn(5))
    model.register_parameter("unused_for_test", unused)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = {}
    for step in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        for x in ids[step:] + ids[:step]:
            _loss(model, x).backward()
        ref[step] = [p.grad.clone() for p in params]
    monkeypatch.setenv("MEGACPP_GRAD_SUM", "foreach")         # opt-in (the default is autograd's)
    acc = GradAccumulator(model, enabled=True)
    assert acc.enabled
    for p in params:
        p.grad = torch.full_like(p, 7.0)     # stale values the first copy must overwrite
    for step in range(2):
        for x in ids[step:] + ids[:step]:
            acc.backward(_loss(model, x))
        for p, want in zip(params, ref[step]):
            assert torch.equal(p.grad, want)
        assert torch.equal(unused.grad, torch.zeros(5))
        acc.zero_grad(None, set_to_none=False)   # enabled: no optimizer call, the next step copies


def test_grad_accumulator_off_is_plain_backward(seed, monkeypatch):
    from megacpp.train.grads import GradAccumulator

    model, ids = _tiny_model_and_batches(2)
    monkeypatch.delenv("MEGACPP_GRAD_SUM", raising=False)
    assert not GradAccumulator(model, enabled=True).enabled    # the default: autograd's sum
    monkeypatch.setenv("MEGACPP_GRAD_SUM", "autograd")
    assert not GradAccumulator(model, enabled=True).enabled
    monkeypatch.setenv("MEGACPP_GRAD_SUM", "foreach")
    assert GradAccumulator(model, enabled=True).enabled
    monkeypatch.setenv("MEGACPP_GRAD_SUM", "fast")
    with pytest.raises(ValueError, match="MEGACPP_GRAD_SUM='fast'"):
        GradAccumulator(model, enabled=True)
    monkeypatch.delenv("MEGACPP_GRAD_SUM")
    acc = GradAccumulator(model, enabled=False)
    assert not acc.enabled
    acc.backward(_loss(model, ids[0]))
    first = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    acc.backward(_loss(model, ids[1]))
    assert first and any(not torch.equal(a, p.grad) for a, p in zip(first, [p for p in model.parameters() if p.grad is not None]))

    class Opt:
        called = None

        def zero_grad(self, set_to_none):
            Opt.called = set_to_none
    acc.zero_grad(Opt(), set_to_none=True)
    assert Opt.called is True


def test_val_line_says_which_steps_were_evaluated():
    """`megacpp train`'s closing line: the evals' steps, never a start value
    repeated as the end's (30 steps with no later eval printed "4.3568 at start
    -> 4.3568 at the end" on an H200, eighteenth session)."""
    from megacpp.cli import val_line

    o = {"first_val_bpb": 4.35678, "final_val_bpb": 2.5, "first_val_step": 0, "final_val_step": 200, "steps": 200}
    assert val_line(o) == "val bits/byte: 4.3568 at step 0 -> 2.5000 at step 200"
    o.update(final_val_bpb=4.35678, final_val_step=0, steps=30)
    assert val_line(o) == "val bits/byte: 4.3568 at step 0 (no eval after it; the run ended at step 30)"
    o.update(final_val_bpb=None, final_val_step=None, steps=60)
    assert val_line(o) == "val bits/byte: 4.3568 at step 0 (no eval since the resume; the run ended at step 60)"
    old = {"first_val_bpb": 4.0, "final_val_bpb": 3.0, "steps": 9}   # a manifest from before the steps were kept
    assert val_line(old) == "val bits/byte: 4.0000 at start -> 3.0000 at the end"
