"""Small specs for the model tests: every family at sizes that run in milliseconds."""
from __future__ import annotations

import dataclasses

import torch

from megacpp.recipe.spec import (AttentionSpec, MambaSpec, ModelSpec, MoESpec, MTPSpec, NormSpec,
                                 RecurrentSpec)
from megacpp.recipe.validate import validate_model

BASE = ModelSpec(
    name="test", vocab_size=97, hidden_size=32, depth=1, pattern="A", ffn_size=48,
    # a large init so that every sublayer moves the logits well above rounding
    init_std=0.15,
    attention=AttentionSpec(kind="gqa", num_heads=4, num_kv_heads=2, rotary_fraction=0.5, qk_norm=True,
                            q_lora_rank=0, kv_lora_rank=16, qk_head_dim=8, qk_rope_dim=4, v_head_dim=6,
                            index_heads=2, index_head_dim=8, index_topk=5),
    mamba=MambaSpec(version=2, state_dim=8, head_dim=8, expand=2, num_groups=2, conv_width=4, chunk_size=8),
    moe=MoESpec(num_experts=4, top_k=2, expert_ffn=16, shared_ffn=16),
    recurrent=RecurrentSpec(num_heads=2, key_dim=8, value_dim=6, conv_width=4, chunk_size=8),
)

_SUB = {"attention": AttentionSpec, "mamba": MambaSpec, "moe": MoESpec, "recurrent": RecurrentSpec,
        "norm": NormSpec, "mtp": MTPSpec}


def make_spec(pattern: str = "A", depth: int | None = None, **kw) -> ModelSpec:
    """BASE with a pattern and overrides; sub-specs take dicts of changed fields."""
    changes = {"pattern": pattern, "depth": depth or len(pattern.replace("|", ""))}
    for k, v in kw.items():
        if k in _SUB and isinstance(v, dict):
            v = dataclasses.replace(getattr(BASE, k), **v)
        changes[k] = v
    spec = dataclasses.replace(BASE, **changes)
    validate_model(spec)
    return spec


# One spec per family / variant (name -> spec), each model a single layer of that letter.
FAMILY_SPECS = {
    "gqa": make_spec("A"),
    "gqa-full-rotary-no-qknorm": make_spec("A", attention={"rotary_fraction": 1.0, "qk_norm": False,
                                                           "num_kv_heads": 4}),
    "mla": make_spec("A", attention={"kind": "mla"}),
    "mla-qlora": make_spec("A", attention={"kind": "mla", "q_lora_rank": 12}),
    "dsa-gqa": make_spec("D"),
    "dsa-mla": make_spec("D", attention={"kind": "mla"}),
    "mamba2": make_spec("M"),
    "mamba3": make_spec("M", mamba={"version": 3}),
    "gated_deltanet": make_spec("R"),
    "moe-softmax": make_spec("E"),
    "moe-sigmoid-bias": make_spec("E", moe={"score": "sigmoid", "bias_balancing": True}),
    "moe-null": make_spec("E", moe={"null_experts": 2, "top_k": 3}),
    "mlp-swiglu": make_spec("F"),
    "mlp-relu2": make_spec("F", activation="relu2"),
}

# Patterns with every letter, over the Mamba and attention variants.
ALL_LETTER_SPECS = {
    f"ADMREF-mamba{v}-{a}": make_spec("ADMREF", attention={"kind": a}, mamba={"version": v},
                                      moe={"score": "sigmoid", "bias_balancing": True})
    for v in (2, 3) for a in ("gqa", "mla")
}
ALL_LETTER_SPECS["ADMREF-layernorm-mtp"] = make_spec(
    "ADMREF", norm={"kind": "layernorm"}, mamba={"version": 3}, tie_embeddings=True,
    mtp={"depths": 2, "pattern": "ME"})


def build(spec: ModelSpec, dtype=torch.float64):
    from megacpp import build_model

    model = build_model(spec).to(dtype)
    _randomise_run_state(model)
    return model.eval()


def _randomise_run_state(model) -> None:
    """Give MoE selection biases non-zero values so they take part in the tests."""
    from megacpp.model.moe import MoE

    for mod in model.modules():
        if isinstance(mod, MoE) and mod.expert_bias is not None:
            with torch.no_grad():
                mod.expert_bias.normal_(0.0, 0.05)
