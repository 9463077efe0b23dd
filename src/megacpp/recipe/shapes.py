"""The parameter table of a ModelSpec: every parameter's name and shape.

This is the contract between the recipe and the model: `build_model(spec)`
creates exactly these parameters (a test compares names and shapes), so the
counts printed by `megacpp describe` are the model's counts. No torch here.

Naming: `embed`, `layers.{i}.norm` (the pre-norm seam, when "pre"),
`layers.{i}.{family}.*` with family attention | mamba | recurrent | moe | mlp,
`final_norm`, `head` (absent when tied), `mtp.{k}.*` for multi-token depths.
Norms inside sublayers (q/kv latent norms, Mamba's gated norm, Mamba-3's B/C
norms, the recurrent output norm) are always RMSNorm with a weight only; the
seam norms and the final norm follow model.norm.kind (layernorm adds a bias).
"""
from __future__ import annotations

from math import prod

from .pattern import FAMILY, FAMILY_KEY, parse_pattern
from .spec import ModelSpec

Shape = tuple[int, ...]


def _gated(activation: str) -> bool:
    return activation in ("swiglu", "geglu")


def _norm(spec: ModelSpec, prefix: str) -> dict[str, Shape]:
    d = spec.hidden_size
    out = {f"{prefix}.weight": (d,)}
    if spec.norm.kind == "layernorm":
        out[f"{prefix}.bias"] = (d,)
    return out


def attention_shapes(spec: ModelSpec, dsa: bool) -> dict[str, Shape]:
    a, d = spec.attention, spec.hidden_size
    H = a.num_heads
    s: dict[str, Shape] = {}
    if a.kind == "gqa":
        hd = spec.attn_head_dim
        s["q_proj.weight"] = (H * hd, d)
        s["k_proj.weight"] = (a.num_kv_heads * hd, d)
        s["v_proj.weight"] = (a.num_kv_heads * hd, d)
        if a.qk_norm:
            s["q_norm.weight"] = (hd,)
            s["k_norm.weight"] = (hd,)
        s["o_proj.weight"] = (d, H * hd)
    else:  # mla
        qk = a.qk_head_dim + a.qk_rope_dim
        if a.q_lora_rank:
            s["q_down.weight"] = (a.q_lora_rank, d)
            s["q_norm.weight"] = (a.q_lora_rank,)
            s["q_up.weight"] = (H * qk, a.q_lora_rank)
        else:
            s["q_proj.weight"] = (H * qk, d)
        s["kv_down.weight"] = (a.kv_lora_rank + a.qk_rope_dim, d)
        s["kv_norm.weight"] = (a.kv_lora_rank,)
        s["kv_up.weight"] = (H * (a.qk_head_dim + a.v_head_dim), a.kv_lora_rank)
        s["o_proj.weight"] = (d, H * a.v_head_dim)
    if dsa:
        s["indexer.q_proj.weight"] = (a.index_heads * a.index_head_dim, d)
        s["indexer.k_proj.weight"] = (a.index_head_dim, d)
        s["indexer.w_proj.weight"] = (a.index_heads, d)
    return s


def mamba_shapes(spec: ModelSpec) -> dict[str, Shape]:
    # The module's own tensors first (PyTorch lists them before submodules'),
    # then the projections, convs and norms in registration order.
    m, d = spec.mamba, spec.hidden_size
    di, H, G, N = spec.mamba_d_inner, spec.mamba_heads, m.num_groups, m.state_dim
    s: dict[str, Shape] = {}
    if m.version == 3:
        s["B_bias"] = (H, N)
        s["C_bias"] = (H, N)
    s["dt_bias"] = (H,)
    s["A_log"] = (H,)
    s["D"] = (H,)
    if m.version == 2:
        # in_proj -> z (gate), x, B, C, dt
        s["in_proj.weight"] = (2 * di + 2 * G * N + H, d)
        s["conv1d.weight"] = (di + 2 * G * N, 1, m.conv_width)
        s["conv1d.bias"] = (di + 2 * G * N,)
    else:
        # in_proj -> z, x, B, C, dt, lambda (trapezoid mix), theta (rotary angles)
        s["in_proj.weight"] = (2 * di + 2 * G * N + 2 * H + N // 2, d)
        s["B_norm.weight"] = (N,)
        s["C_norm.weight"] = (N,)
    s["norm.weight"] = (di,)
    s["out_proj.weight"] = (d, di)
    return s


def recurrent_shapes(spec: ModelSpec) -> dict[str, Shape]:
    r, d = spec.recurrent, spec.hidden_size
    H, dk, dv, K = r.num_heads, r.key_dim, r.value_dim, r.conv_width
    return {
        "A_log": (H,),
        "dt_bias": (H,),
        "q_proj.weight": (H * dk, d),
        "k_proj.weight": (H * dk, d),
        "v_proj.weight": (H * dv, d),
        "q_conv.weight": (H * dk, 1, K),
        "k_conv.weight": (H * dk, 1, K),
        "v_conv.weight": (H * dv, 1, K),
        "a_proj.weight": (H, d),
        "b_proj.weight": (H, d),
        "g_proj.weight": (H * dv, d),
        "o_norm.weight": (dv,),
        "o_proj.weight": (d, H * dv),
    }


def moe_shapes(spec: ModelSpec) -> dict[str, Shape]:
    e, d = spec.moe, spec.hidden_size
    up = 2 if _gated(spec.activation) else 1
    s: dict[str, Shape] = {
        "router.weight": (e.num_experts + e.null_experts, d),
        # laid out for x @ w in a grouped GEMM
        "experts.w_in": (e.num_experts, d, up * e.expert_ffn),
        "experts.w_out": (e.num_experts, e.expert_ffn, d),
    }
    if e.shared_ffn:
        s["shared.w_in.weight"] = (up * e.shared_ffn, d)
        s["shared.w_out.weight"] = (d, e.shared_ffn)
    return s


def mlp_shapes(spec: ModelSpec) -> dict[str, Shape]:
    up = 2 if _gated(spec.activation) else 1
    return {"w_in.weight": (up * spec.ffn_size, spec.hidden_size),
            "w_out.weight": (spec.hidden_size, spec.ffn_size)}


def sublayer_shapes(spec: ModelSpec, letter: str) -> dict[str, Shape]:
    if letter in "AD":
        return attention_shapes(spec, dsa=letter == "D")
    if letter == "M":
        return mamba_shapes(spec)
    if letter == "R":
        return recurrent_shapes(spec)
    if letter == "E":
        return moe_shapes(spec)
    return mlp_shapes(spec)


def layer_shapes(spec: ModelSpec, letter: str, prefix: str) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    if spec.norm.seams[FAMILY_KEY[letter]] == "pre":
        out.update(_norm(spec, f"{prefix}.norm"))
    for k, v in sublayer_shapes(spec, letter).items():
        out[f"{prefix}.{FAMILY[letter]}.{k}"] = v
    return out


def mtp_letters(spec: ModelSpec) -> str:
    return "".join(c for c in spec.mtp.pattern if not c.isspace())


def model_shapes(spec: ModelSpec) -> dict[str, Shape]:
    """Every parameter of HybridLM(spec), in module registration order."""
    d, V = spec.hidden_size, spec.vocab_size
    out: dict[str, Shape] = {"embed.weight": (V, d)}
    parsed = parse_pattern(spec.pattern, spec.depth, spec.overrides)
    for layer in parsed.layers:
        out.update(layer_shapes(spec, layer.letter, f"layers.{layer.index}"))
    out.update(_norm(spec, "final_norm"))
    if not spec.tie_embeddings:
        out["head.weight"] = (V, d)
    for k in range(spec.mtp.depths):
        p = f"mtp.{k}"
        out.update(_norm(spec, f"{p}.hnorm"))
        out.update(_norm(spec, f"{p}.enorm"))
        out[f"{p}.proj.weight"] = (d, 2 * d)
        for j, c in enumerate(mtp_letters(spec)):
            out.update(layer_shapes(spec, c, f"{p}.layers.{j}"))
        out.update(_norm(spec, f"{p}.norm"))
    return out


def numel(shape: Shape) -> int:
    return prod(shape)


def sublayer_active_params(spec: ModelSpec, letter: str) -> int:
    """Parameters one token touches in a sublayer (MoE: top-k routed experts + shared)."""
    shapes = sublayer_shapes(spec, letter)
    total = sum(numel(s) for s in shapes.values())
    if letter != "E":
        return total
    e = spec.moe
    per_expert = (numel(shapes["experts.w_in"]) + numel(shapes["experts.w_out"])) // e.num_experts
    # an upper bound when null experts take some of the top-k slots
    return total - per_expert * e.num_experts + per_expert * min(e.top_k, e.num_experts)
