"""The model's parameters are exactly the recipe's parameter table."""
from __future__ import annotations

import pytest
import torch

import megacpp
from megacpp.recipe.presets import PRESETS
from megacpp.recipe.shapes import model_shapes, sublayer_shapes

from model_testutil import ALL_LETTER_SPECS, FAMILY_SPECS, make_spec


def param_table(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def assert_matches(model, spec):
    got, want = param_table(model), model_shapes(spec)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing and not extra, f"missing {missing[:8]}, extra {extra[:8]}"
    wrong = {n: (got[n], want[n]) for n in want if got[n] != want[n]}
    assert not wrong, f"shape mismatch (got, want): {wrong}"
    assert model.num_params() == sum(torch.Size(s).numel() for s in want.values())


def _distinct_models() -> list[str]:
    """Presets but nam56r (on meta below), one per model spec: a preset that only
    changes run policy (nam-1b-fp8) builds the same model as its base."""
    seen, names = [], []
    for n in PRESETS:
        spec = megacpp.load_recipe(n).model
        if n != "nam56r" and spec not in seen:
            seen.append(spec)
            names.append(n)
    return names


@pytest.mark.parametrize("name", _distinct_models())
def test_presets_match_shapes(name):
    """Built on the CPU with their weights initialised; past 300M parameters
    (nam-1b: ~13 s of CPU init on CI's 2 cores) on meta, which checks the shapes."""
    from megacpp.recipe.count import summarize
    recipe = megacpp.load_recipe(name)
    spec = recipe.model
    big = summarize(recipe).total_params > 300_000_000
    with torch.device("meta" if big else "cpu"):
        model = megacpp.build_model(spec)
    assert_matches(model, spec)
    assert all(p.device.type == ("meta" if big else "cpu") for p in model.parameters())


def test_nam56r_on_meta_matches_shapes():
    spec = megacpp.load_recipe("nam56r").model
    with torch.device("meta"):
        model = megacpp.build_model(spec)
    assert_matches(model, spec)
    assert all(p.is_meta for p in model.parameters())
    report = model.layer_report()
    assert len(report) == 52
    assert [r["letter"] for r in report[:12]] == list("AEMEAEMEAEMR")
    assert {r["variant"] for r in report} == {"mla", "moe-sigmoid-top4x16+shared", "mamba3",
                                                  "gated_deltanet"}
    # layer_report's counts are the table's counts per layer
    for r in report:
        want = sum(torch.Size(s).numel() for n, s in model_shapes(spec).items()
                   if n.startswith(f"layers.{r['index']}."))
        assert r["params"] == want


@pytest.mark.parametrize("name", list(FAMILY_SPECS) + list(ALL_LETTER_SPECS))
def test_test_specs_match_shapes(name):
    spec = {**FAMILY_SPECS, **ALL_LETTER_SPECS}[name]
    assert_matches(megacpp.build_model(spec), spec)


@pytest.mark.parametrize("kw", [
    {"norm": {"kind": "layernorm"}},
    {"norm": {"seams": {"A": "none", "M": "pre", "R": "none", "E": "none", "F": "none"}}},
    {"tie_embeddings": True, "activation": "gelu"},
    {"mtp": {"depths": 2, "pattern": "AE"}},
    {"attention": {"kind": "mla", "q_lora_rank": 8}, "moe": {"null_experts": 3, "shared_ffn": 0}},
    {"overrides": {0: "R", 3: "D"}, "mamba": {"version": 3}},
])
def test_variants_match_shapes(kw):
    spec = make_spec("AMEF", **kw)
    model = megacpp.build_model(spec)
    assert_matches(model, spec)
    seams = {r["letter"]: r["seam"] for r in model.layer_report()}
    for letter, seam in seams.items():
        fam = "A" if letter == "D" else letter
        assert seam == spec.norm.seams[fam]
        layer = next(l for l in model.layers if l.letter == letter)
        assert (layer.norm is None) == (seam == "none")


def test_layer_report_and_num_params():
    spec = make_spec("ADMREF", mamba={"version": 3}, moe={"score": "sigmoid", "bias_balancing": True})
    model = megacpp.build_model(spec)
    rep = model.layer_report()
    assert [(r["index"], r["letter"], r["family"]) for r in rep] == [
        (0, "A", "attention"), (1, "D", "attention"), (2, "M", "mamba"),
        (3, "R", "recurrent"), (4, "E", "moe"), (5, "F", "mlp")]
    assert [r["variant"] for r in rep] == ["gqa", "gqa+dsa", "mamba3", "gated_deltanet",
                                           "moe-sigmoid-top2x4+shared", "swiglu"]
    for r in rep:
        assert r["params"] == sum(torch.Size(s).numel() for s in sublayer_shapes(spec, r["letter"]).values()) \
            + spec.hidden_size  # the pre-norm seam
    total = model.num_params()
    assert total == sum(p.numel() for p in model.parameters())
    assert model.num_params(exclude_embedding=True) == total - spec.vocab_size * spec.hidden_size
    ec = make_spec("E", moe={"routing": "expert_choice", "capacity_factor": 1.0})
    assert megacpp.build_model(ec).layer_report()[0]["variant"] == "moe-softmax-expert-choicex4+shared"


def test_buffers_are_not_parameters():
    spec = make_spec("E", moe={"score": "sigmoid", "bias_balancing": True})
    model = megacpp.build_model(spec)
    names = dict(model.named_buffers())
    assert "layers.0.moe.expert_bias" in names
    assert "layers.0.moe.expert_bias" not in dict(model.named_parameters())
    assert "layers.0.moe.expert_bias" in model.state_dict()


def test_tied_head_weight():
    spec = make_spec("AF", tie_embeddings=True)
    model = megacpp.build_model(spec)
    assert model.head_weight is model.embed.weight
    untied = megacpp.build_model(make_spec("AF"))
    assert untied.head_weight is untied.head.weight


@pytest.mark.parametrize("name", ["ADMREF-mamba2-gqa", "ADMREF-mamba3-mla", "ADMREF-layernorm-mtp"])
def test_registration_order(name):
    """named_parameters equals model_shapes exactly, order included (the table
    lists each sublayer's own tensors before its submodules', as nn.Module does)."""
    spec = ALL_LETTER_SPECS[name]
    got = [(n, tuple(p.shape)) for n, p in megacpp.build_model(spec).named_parameters()]
    assert got == list(model_shapes(spec).items())
