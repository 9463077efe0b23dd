"""A kernel backend forced where it cannot run, or a bad MEGACPP_* value, stops
`megacpp train` with one line naming it (exit 2), before any step runs."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.parametrize("env,msg", [
    ({"MEGACPP_SSD": "bogus"}, "Mamba SSD scan: MEGACPP_SSD='bogus': expected one of"),
    ({"MEGACPP_DELTA_RULE": "triton"}, "gated delta rule: MEGACPP_DELTA_RULE=triton, but the Triton gated delta rule cannot run"),
    ({"MEGACPP_GRAD_SUM": "fast"}, "gradient sum: MEGACPP_GRAD_SUM='fast': expected autograd or foreach"),
])
def test_bad_kernel_choice_is_one_clear_error(env, msg, tiny_snapshot, tmp_path):
    if torch.cuda.is_available() and env.get("MEGACPP_DELTA_RULE") == "triton":
        pytest.skip("CUDA here: the forced kernel may run")
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "megacpp", "train", "--recipe", "nam-tiny", "--data",
                        str(tiny_snapshot), "--out", str(out), "--device", "cpu", "--quiet", "--max-steps", "1",
                        "--set", "model.vocab_size=512", "--set", "policy.seq_len=64"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert p.returncode == 2, p.stderr[-2000:]
    assert msg in p.stderr and "Traceback" not in p.stderr
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_ssd_states_policy_reaches_every_mamba_mixer_and_is_validated():
    import megacpp
    from megacpp.errors import RecipeError
    from megacpp.model.mamba import _MambaBase
    from megacpp.train.activation import apply_ssd_states

    recipe = megacpp.load_recipe("nam-tiny", ["policy.kernels.ssd_states=keep"])
    model = megacpp.build_model(recipe.model)
    mixers = [m for m in model.modules() if isinstance(m, _MambaBase)]
    assert mixers and not any(m.keep_ssd_states for m in mixers)   # the class default: recompute
    assert apply_ssd_states(model, recipe.policy.kernels.ssd_states) == len(mixers)
    assert all(m.keep_ssd_states for m in mixers)
    assert apply_ssd_states(model, "recompute") == len(mixers) and not any(m.keep_ssd_states for m in mixers)
    dense = megacpp.build_model(megacpp.load_recipe("dense-125m", ["model.depth=2", "model.hidden_size=96", "model.vocab_size=256"]).model)
    assert apply_ssd_states(dense, "keep") == 0
    with pytest.raises(RecipeError, match="policy.kernels.ssd_states"):
        megacpp.load_recipe("nam-tiny", ["policy.kernels.ssd_states=sometimes"])


def test_delta_states_policy_reaches_every_recurrent_mixer_is_validated_and_flagged():
    import megacpp
    from megacpp.errors import RecipeError
    from megacpp.model.recurrent import GatedDeltaNet
    from megacpp.recipe.megatron import translate
    from megacpp.train.activation import apply_delta_states

    recipe = megacpp.load_recipe("nam-tiny", ["policy.kernels.delta_states=keep"])
    model = megacpp.build_model(recipe.model)
    mixers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    assert mixers and not any(m.keep_delta_states for m in mixers)   # the class default: recompute
    assert apply_delta_states(model, recipe.policy.kernels.delta_states) == len(mixers)
    assert all(m.keep_delta_states for m in mixers)
    with pytest.raises(RecipeError, match="policy.kernels.delta_states"):
        megacpp.load_recipe("nam-tiny", ["policy.kernels.delta_states=sometimes"])
    assert any("kernels.delta_states" in i for i in translate(recipe).issues)
    assert not any("kernels.delta_states" in i for i in translate(megacpp.load_recipe("nam-tiny")).issues)


def test_moe_wgrad_splits_policy_reaches_every_expert_module_is_validated_and_flagged():
    import megacpp
    from megacpp.errors import RecipeError
    from megacpp.model.moe import Experts
    from megacpp.recipe.megatron import translate
    from megacpp.train.activation import apply_moe_wgrad_splits
    from megacpp.train.trainer import moe_wgrad_splits

    recipe = megacpp.load_recipe("nam-tiny", ["policy.kernels.moe_wgrad_splits=4"])
    model = megacpp.build_model(recipe.model)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and moe_wgrad_splits(model) == 1          # the class default: torch's own backward
    assert apply_moe_wgrad_splits(model, recipe.policy.kernels.moe_wgrad_splits) == len(experts)
    assert all(m.wgrad_splits == 4 for m in experts) and moe_wgrad_splits(model) == 4
    dense = megacpp.build_model(megacpp.load_recipe("dense-125m", ["model.depth=2", "model.hidden_size=96", "model.vocab_size=256"]).model)
    assert apply_moe_wgrad_splits(dense, 4) == 0 and moe_wgrad_splits(dense) is None
    for bad in ("0", "17", "two"):
        with pytest.raises(RecipeError, match="policy.kernels.moe_wgrad_splits"):
            megacpp.load_recipe("nam-tiny", [f"policy.kernels.moe_wgrad_splits={bad}"])
    assert any("kernels.moe_wgrad_splits" in i for i in translate(recipe).issues)
    assert not any("kernels.moe_wgrad_splits" in i for i in translate(megacpp.load_recipe("nam-tiny")).issues)
    assert megacpp.load_recipe("nam-125m").policy.kernels.moe_wgrad_splits == 4   # its measured A/B


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_conv_paths_name_each_width_kernels():
    """What the manifest records on CUDA for the Triton conv: each depthwise
    conv width of the model and the kernels its forward and backward take."""
    import megacpp
    from megacpp.ops.causal_conv import triton_conv as T
    from megacpp.train.trainer import conv_paths

    recipe = megacpp.load_recipe("nam-tiny", ["model.mamba.version=2", "model.mamba.conv_width=4",
                                            "model.recurrent.conv_width=6"])
    model = megacpp.build_model(recipe.model)
    assert conv_paths(model) == {"4": {"fwd": "walk", "bwd": "walk"}, "6": {"fwd": "tiles", "bwd": "tiles"}}
    old = dict(T.PATH)
    T.PATH.update(bwd="tiles")
    try:
        assert conv_paths(model)["4"] == {"fwd": "walk", "bwd": "tiles"}
    finally:
        T.PATH.update(old)


def test_mamba_in_proj_policy_is_validated_flagged_and_a_preset_choice():
    import megacpp
    from megacpp.errors import RecipeError
    from megacpp.recipe.megatron import translate

    with pytest.raises(RecipeError, match="policy.kernels.mamba_in_proj"):
        megacpp.load_recipe("nam-tiny", ["policy.kernels.mamba_in_proj=three"])
    split = megacpp.load_recipe("nam-tiny", ["policy.kernels.mamba_in_proj=split"])
    assert any("kernels.mamba_in_proj" in i for i in translate(split).issues)
    assert not any("kernels.mamba_in_proj" in i for i in translate(megacpp.load_recipe("nam-tiny")).issues)
    # its measured A/B (BENCHMARKS.md, twentieth session); other presets keep one GEMM
    assert megacpp.load_recipe("nam-125m").policy.kernels.mamba_in_proj == "split"
    assert megacpp.load_recipe("nam-1b").policy.kernels.mamba_in_proj == "one"


def test_moe_gate_policy_is_validated_flagged_and_recorded(tmp_path):
    """policy.kernels.moe_gate: a bad value is one error naming the field; the
    Megatron translation flags "activation"; a run records how many E layers
    took the gates in the activation (nam-125m takes "activation" after its
    GPU A/B, twenty-second session; the other presets keep "combine")."""
    import megacpp
    from megacpp.errors import RecipeError
    from megacpp.recipe.megatron import translate
    from megacpp.train.activation import apply_moe_gate, moe_gate_layers

    with pytest.raises(RecipeError, match="policy.kernels.moe_gate"):
        megacpp.load_recipe("nam-tiny", ["policy.kernels.moe_gate=before"])
    act = megacpp.load_recipe("nam-tiny", ["policy.kernels.moe_gate=activation"])
    assert any("kernels.moe_gate" in i for i in translate(act).issues)
    assert not any("kernels.moe_gate" in i for i in translate(megacpp.load_recipe("nam-tiny")).issues)
    for name in ("nam-tiny", "nam-1b", "nam56r"):
        assert megacpp.load_recipe(name).policy.kernels.moe_gate == "combine"
    assert megacpp.load_recipe("nam-125m").policy.kernels.moe_gate == "activation"
    model = megacpp.build_model(act.model)
    e_layers = act.layers.letters.count("E")
    assert e_layers > 0
    assert apply_moe_gate(model, act.policy.kernels.moe_gate) == e_layers == moe_gate_layers(model)
