"""Which GEMMs a low-precision recipe converts, and the FP8 path's refusals."""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from torch import nn

import megacpp
from megacpp.errors import MegacppError
from megacpp.recipe.policy import PrecisionSpec
from megacpp.train.lowp import convert_low_precision, linear_decision, name_match, plan_conversion
from megacpp.train.lowp.nvfp4 import NVFP4EmulatedLinear
from megacpp.train.precision import Precision

FP32 = PrecisionSpec().fp32_modules
CPU = torch.device("cpu")
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def backward_under_bf16(model, recipe) -> None:
    """One forward under CPU bf16 autocast on random ids, and a backward."""
    ids = torch.randint(0, recipe.model.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids)
    out.logits.float().logsumexp(-1).mean().backward()


def decide(name, i, o, **kw):
    kw.setdefault("fp32_modules", FP32)
    return linear_decision(name, i, o, **kw)


# ---------------------------------------------------------------- the pure rule
def test_name_match_is_by_dotted_part_suffix():
    assert name_match("layers.2.mamba.A_log", FP32) == "A_log"
    assert name_match("layers.2.mamba.D", FP32) == "D"
    assert name_match("layers.0.attention.kv_norm.weight", FP32) == "norm"
    assert name_match("mtp.0.hnorm.weight", FP32) == "norm"
    assert name_match("layers.1.moe.router.weight", FP32) == "router"
    assert name_match("layers.0.attention.o_proj.weight", FP32) is None
    assert name_match("layers.3.Dense.weight", ("D",)) is None  # contains D, does not end in it
    assert name_match("normalizer.weight", ("norm",)) is None


@pytest.mark.parametrize("name, i, o, convert, why", [
    ("head", 768, 32768, False, "output head"),
    ("mtp_head", 768, 32768, False, "output head"),
    ("layers.1.moe.router", 768, 16, False, "router"),
    ("layers.5.mamba.gate_norm", 768, 768, False, "fp32_modules matches 'norm'"),
    ("layers.0.attention.q_proj", 768, 768, True, ""),
    ("layers.0.attention.q_proj", 768, 760, False, "multiples of 16"),
    ("layers.0.attention.q_proj", 100, 768, False, "multiples of 16"),
    ("layers.11.recurrent.a_proj", 768, 4, False, "multiples of 16"),
])
def test_linear_decision_rules(name, i, o, convert, why):
    ok, reason = decide(name, i, o)
    assert ok is convert
    assert why in reason


def test_size_threshold_and_rule_order():
    assert decide("layers.0.mlp.w_in", 256, 256, min_gemm_size=256 * 256) == (True, "")
    ok, why = decide("layers.0.mlp.w_in", 256, 256, min_gemm_size=256 * 256 + 1)
    assert not ok and "65536 < policy.precision.min_gemm_size 65537" in why
    # roles come before size: a big router is still kept as a router
    assert "router" in decide("x.router", 4096, 4096, min_gemm_size=1)[1]
    # an emptied fp32_modules list lets a norm-named GEMM convert, never the head
    assert decide("a.gate_norm", 64, 64, fp32_modules=())[0]
    assert not decide("head", 64, 64, fp32_modules=())[0]


# ---------------------------------------------------------------- the model's table
@pytest.fixture(scope="module")
def tiny():
    return megacpp.load_recipe("nam-tiny")


def test_plan_on_the_hybrid_model(tiny):
    model = megacpp.build_model(tiny.model)
    rows = {g.name: g for g in plan_conversion(model, FP32, 0, converted_as="x")}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert linears <= rows.keys()
    assert not rows["head"].convert and not rows["embed"].convert
    assert rows["embed"].kind == "embedding"
    assert all(not rows[n].convert for n in linears if n.endswith("router"))
    experts = [g for g in rows.values() if g.kind == "grouped_experts"]
    assert len(experts) == 2 * 5 and all(not g.convert and "grouped" in g.reason for g in experts)
    assert rows["layers.1.moe.experts.w_in"].shape == (8, 128, 256)
    # Mamba-3 in_proj of nam-tiny is 128 -> 568: 568 is not 16-aligned
    assert not rows["layers.2.mamba.in_proj"].convert
    assert rows["layers.0.attention.q_proj"].convert and rows["layers.0.attention.q_proj"].reason == "x"
    assert rows["layers.0.attention.q_proj"].shape == (128, 192)
    d = rows["layers.11.recurrent.a_proj"].to_dict()
    assert d == {"name": "layers.11.recurrent.a_proj", "kind": "linear", "shape": [128, 4],
                 "decision": "keep", "reason": d["reason"]} and "16" in d["reason"]
    big = {g.name for g in plan_conversion(model, FP32, 128 * 200) if g.convert}
    assert big and all(rows[n].shape[0] * rows[n].shape[1] >= 128 * 200 for n in big)


def test_nvfp4_conversion_swaps_exactly_the_planned_modules(tiny):
    model = megacpp.build_model(tiny.model)
    before = {n: p for n, p in model.named_parameters()}
    spec = dataclasses.replace(tiny.policy.precision, low_precision="nvfp4_emulated")
    rep = convert_low_precision(model, spec, CPU)
    swapped = {n for n, m in model.named_modules() if isinstance(m, NVFP4EmulatedLinear)}
    assert swapped == set(rep.converted) and len(swapped) > 10
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    d = rep.to_dict()
    assert d["emulated"] is True and d["converted"] == len(swapped) and "emulated" in d["native"]
    assert d["converted"] + d["kept"] == len(d["gemms"])


def test_none_converts_nothing(tiny):
    model = megacpp.build_model(tiny.model)
    rep = convert_low_precision(model, tiny.policy.precision, CPU)
    assert rep.to_dict()["gemms"] == [] and not rep.converted
    assert not any(isinstance(m, NVFP4EmulatedLinear) for m in model.modules())


# ---------------------------------------------------------------- FP8
@pytest.mark.parametrize("lp", ["fp8_rowwise", "fp8_tensorwise"])
def test_fp8_refused_on_cpu_with_the_field_named(tiny, lp):
    spec = dataclasses.replace(tiny.policy.precision, compute="bf16", low_precision=lp)
    model = megacpp.build_model(tiny.model)
    p = Precision(spec, CPU)
    with pytest.raises(MegacppError, match=f"policy.precision.low_precision={lp}: .*CUDA"):
        p.apply(model)
    assert not any(type(m).__name__ == "Float8Linear" for m in model.modules())


def test_fp8_needs_bf16_compute(monkeypatch):
    from megacpp.train.lowp import fp8
    monkeypatch.setattr(fp8, "fp8_unavailable", lambda device: None)
    with pytest.raises(MegacppError, match="policy.precision.compute must be bf16"):
        fp8.require_fp8("fp8_rowwise", "fp32", CPU)
    fp8.require_fp8("fp8_rowwise", "bf16", CPU)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao not installed")
@pytest.mark.parametrize("lp", ["fp8_rowwise", "fp8_tensorwise"])
def test_fp8_swap_follows_the_filter(tiny, lp):
    # torchao's emulated FP8 GEMM runs on CPU: check the swap, not the speed
    model = megacpp.build_model(tiny.model)
    spec = dataclasses.replace(tiny.policy.precision, compute="bf16", low_precision=lp,
                               min_gemm_size=128 * 192)
    rep = convert_low_precision(model, spec, CPU, fp8_emulate=True)
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    plan = {g.name for g in plan_conversion(megacpp.build_model(tiny.model), spec.fp32_modules,
                                            spec.min_gemm_size) if g.convert}
    assert swapped == set(rep.converted) == plan and swapped
    assert "layers.0.attention.o_proj" not in swapped  # 128*128 is under the size threshold
    assert rep.to_dict()["recipe"] == lp and lp.split("_")[1] in rep.backend
    backward_under_bf16(model, tiny)
    assert torch.isfinite(model.layers[0].attention.q_proj.weight.grad).all()


def test_converted_flops_share_of_a_dense_recipe_by_hand():
    """dense-125m (GQA 12 q / 4 kv heads of 64, SwiGLU 2048): each A layer's
    q, k, v, o and each F layer's w_in (two halves) and w_out convert; the
    head and embedding stay. Expected FLOPs written out from the dims."""
    from megacpp import load_recipe
    from megacpp.recipe.count import summarize
    from megacpp.train.lowp import conversion_plan_summary

    r = load_recipe("dense-125m", ["policy.precision.low_precision=fp8_rowwise"])
    d, kv, ffn, layers = 768, 4 * 64, 2048, 12
    per_attn = d * d + 2 * d * kv + d * d
    per_mlp = d * 2 * ffn + ffn * d
    want = 6.0 * layers * (per_attn + per_mlp)
    got = conversion_plan_summary(r)
    assert got["converted"] == 12 * 4 + 12 * 2
    assert got["converted_flops_per_token"] == want
    assert got["share_of_model_flops"] == pytest.approx(want / summarize(r).flops_per_token)
    # a threshold above the attention projections keeps them, and the share drops
    small = load_recipe("dense-125m", ["policy.precision.low_precision=fp8_rowwise",
                                       f"policy.precision.min_gemm_size={d * d + 1}"])
    assert conversion_plan_summary(small)["converted_flops_per_token"] == 6.0 * layers * per_mlp
    assert conversion_plan_summary(load_recipe("dense-125m")) is None


# ---------------------------------------------------------------- FP8 experts
def test_fp8_experts_refused_on_cpu_with_the_field_named(tiny):
    spec = dataclasses.replace(tiny.policy.precision, compute="bf16", expert_low_precision="fp8_rowwise")
    model = megacpp.build_model(tiny.model)
    with pytest.raises(MegacppError, match="policy.precision.expert_low_precision=fp8_rowwise: .*CUDA"):
        Precision(spec, CPU).apply(model)
    from megacpp.model.moe import Experts
    assert all(m.low_precision == "none" for m in model.modules() if isinstance(m, Experts))


def test_fp8_experts_convert_the_grouped_rows_only(tiny):
    from megacpp.model.moe import Experts
    model = megacpp.build_model(tiny.model)
    spec = dataclasses.replace(tiny.policy.precision, compute="bf16", expert_low_precision="fp8_rowwise")
    rep = convert_low_precision(model, spec, CPU, fp8_emulate=True)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert len(experts) == 5 and all(m.low_precision == "fp8_rowwise:emulate" for m in experts)
    conv = [g for g in rep.gemms if g.convert]
    assert len(conv) == 10 and all(g.kind == "grouped_experts" and "_scaled_grouped_mm" in g.reason for g in conv)
    lin = [g for g in rep.gemms if g.kind == "linear"]
    assert lin and all(not g.convert for g in lin)
    assert any(g.reason == "policy.precision.low_precision is none" for g in lin)
    d = rep.to_dict()
    assert d["recipe"] == "none" and d["experts"] == "fp8_rowwise" and "emulated" in d["experts_backend"]
    # forward and input gradient of each expert row: 4 * d_in * d_out, top_k rows a token
    e = tiny.model.moe
    w_in, w_out = model.layers[1].moe.experts.w_in.shape, model.layers[1].moe.experts.w_out.shape
    assert d["converted_flops_per_token"] == 5 * 4.0 * e.top_k * (w_in[1] * w_in[2] + w_out[1] * w_out[2])
    backward_under_bf16(model, tiny)
    assert torch.isfinite(model.layers[1].moe.experts.w_in.grad).all()


def test_fp8_experts_with_their_weight_gradient_convert_and_count_it(tiny):
    """expert_low_precision = "fp8_rowwise_wgrad": the experts take the FP8 weight
    gradient too (their mode string says so, the backend names it) and the
    converted FLOPs count it (6 * d_in * d_out a row, where fp8_rowwise counts 4)."""
    from megacpp.model.moe import Experts
    from megacpp.train.lowp import conversion_plan_summary
    model = megacpp.build_model(tiny.model)
    spec = dataclasses.replace(tiny.policy.precision, compute="bf16", expert_low_precision="fp8_rowwise_wgrad")
    rep = convert_low_precision(model, spec, CPU, fp8_emulate=True)
    assert all(m.low_precision == "fp8_rowwise_wgrad:emulate" for m in model.modules() if isinstance(m, Experts))
    d = rep.to_dict()
    assert d["experts"] == "fp8_rowwise_wgrad" and "weight gradient per expert and column" in d["experts_backend"]
    e = tiny.model.moe
    w_in, w_out = model.layers[1].moe.experts.w_in.shape, model.layers[1].moe.experts.w_out.shape
    assert d["converted_flops_per_token"] == 5 * 6.0 * e.top_k * (w_in[1] * w_in[2] + w_out[1] * w_out[2])
    backward_under_bf16(model, tiny)
    assert torch.isfinite(model.layers[1].moe.experts.w_in.grad).all()
    four = conversion_plan_summary(megacpp.load_recipe("nam-125m", ["policy.precision.expert_low_precision=fp8_rowwise"]))
    six = conversion_plan_summary(megacpp.load_recipe("nam-125m", ["policy.precision.expert_low_precision=fp8_rowwise_wgrad"]))
    assert six["experts"] == "fp8_rowwise_wgrad" and six["converted"] == four["converted"] == 20
    assert six["converted_flops_per_token"] == 1.5 * four["converted_flops_per_token"]


def test_fp8_experts_setting_is_validated_and_translated():
    from megacpp.recipe.megatron import translate
    with pytest.raises(MegacppError, match="policy.precision.expert_low_precision.*must be one of"):
        megacpp.load_recipe("nam-125m", ["policy.precision.expert_low_precision=fp8"])
    with pytest.raises(MegacppError, match="policy.precision.expert_low_precision.*compute"):
        megacpp.load_recipe("nam-125m", ["policy.precision.expert_low_precision=fp8_rowwise",
                                         "policy.precision.compute=fp32"])
    both = megacpp.load_recipe("nam-125m", ["policy.precision.expert_low_precision=fp8_rowwise",
                                            "policy.precision.low_precision=fp8_tensorwise"])
    dense = megacpp.load_recipe("nam-125m", ["policy.precision.low_precision=fp8_tensorwise"])
    assert not any("grouped experts" in i for i in translate(both).issues)
    assert any("grouped experts" in i for i in translate(dense).issues)
    from megacpp.train.lowp import conversion_plan_summary
    s = conversion_plan_summary(megacpp.load_recipe("nam-125m", ["policy.precision.expert_low_precision=fp8_rowwise"]))
    assert s["recipe"] == "none" and s["experts"] == "fp8_rowwise" and s["converted"] == 20
    assert 0 < s["share_of_model_flops"] < 1


def test_fp8_experts_bad_quantizer_env_is_one_clear_error(tiny, monkeypatch):
    import megacpp.ops.fp8_grouped as fg
    monkeypatch.setattr(fg, "fp8_grouped_unavailable", lambda device: None)   # as if on a card that runs it
    monkeypatch.setenv("MEGACPP_FP8_QUANT", "fast")
    spec = dataclasses.replace(tiny.policy.precision, compute="bf16", expert_low_precision="fp8_rowwise")
    with pytest.raises(MegacppError, match="expert_low_precision=fp8_rowwise: MEGACPP_FP8_QUANT='fast'"):
        convert_low_precision(megacpp.build_model(tiny.model), spec, CPU)


def test_bench_names_the_quantizer_the_experts_run(tiny):
    from megacpp.train.bench import _expert_quantizer
    model = megacpp.build_model(tiny.model)
    assert _expert_quantizer(model) == ""                        # not converted: no quantizer
    spec = dataclasses.replace(tiny.policy.precision, compute="bf16", expert_low_precision="fp8_rowwise")
    convert_low_precision(model, spec, CPU, fp8_emulate=True)
    assert _expert_quantizer(model) == "emulate"
