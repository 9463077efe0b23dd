"""Parameters, training FLOPs and a memory estimate for a recipe (no torch).

FLOPs are model FLOPs for one training token (forward + backward = 3x
forward), counted per family:
- matmuls: 2 x every weight a token multiplies (embedding lookups excluded,
  the output head included; MoE counts the top-k routed experts);
- attention: causal QK^T and AV at the recipe's sequence length
  (fwd 2·H·(d_qk + d_v)·L/2 per token); DSA over its top-k keys plus the
  indexer's causal scores;
- Mamba SSD scan per head (chunk Q, state N, head dim P):
  fwd Q·(N + P) within the chunk + 4·N·P through the chunk states (Mamba-3
  runs two input terms, twice that);
- gated delta rule per head (chunk C): fwd C·(2·dk + dv) + 6·dk·dv.
The memory estimate is coarse on purpose (activations in elements saved per
token per layer, see _act_elems); it is labelled an estimate everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

from .pattern import FAMILY
from .recipe import Recipe
from .shapes import model_shapes, mtp_letters, numel, sublayer_active_params, sublayer_shapes
from .spec import ModelSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class LayerRow:
    index: int
    letter: str
    family: str
    variant: str
    norm_seam: str
    params: int
    active_params: int
    flops_per_token: float        # training (fwd + bwd) FLOPs per token


def variant(spec: ModelSpec, letter: str) -> str:
    if letter in "AD":
        base = spec.attention.kind
        return f"{base}+dsa" if letter == "D" else base
    if letter == "M":
        return f"mamba{spec.mamba.version}"
    if letter == "R":
        return spec.recurrent.kind
    if letter == "E":
        m = spec.moe
        route = "expert-choice" if m.routing == "expert_choice" else f"top{m.top_k}"
        v = f"moe-{m.score}-{route}x{m.num_experts}"
        if m.null_experts:
            v += f"+null{m.null_experts}"
        if m.shared_ffn:
            v += "+shared"
        return v
    return spec.activation


def _weight_params(shapes: dict) -> int:
    """Parameters used as multiplicands (matrices and conv taps, not vectors)."""
    return sum(numel(s) for s in shapes.values() if len(s) >= 2)


def sublayer_flops(spec: ModelSpec, letter: str, seq_len: int) -> float:
    shapes = sublayer_shapes(spec, letter)
    if letter == "E":
        e = spec.moe
        w = _weight_params(shapes)
        per_expert = (numel(shapes["experts.w_in"]) + numel(shapes["experts.w_out"])) // e.num_experts
        w = w - per_expert * e.num_experts + per_expert * min(e.top_k, e.num_experts)
        return 6.0 * w
    fwd = 2.0 * _weight_params(shapes)
    if letter in "AD":
        a = spec.attention
        if a.kind == "gqa":
            dqk = dv = spec.attn_head_dim
        else:
            dqk, dv = a.qk_head_dim + a.qk_rope_dim, a.v_head_dim
        keys = seq_len / 2.0
        if letter == "D":
            keys = min(float(a.index_topk), keys)
            fwd += a.index_heads * a.index_head_dim * seq_len  # causal indexer scores
        fwd += 2.0 * a.num_heads * (dqk + dv) * keys
    elif letter == "M":
        m = spec.mamba
        Q, N, P = m.chunk_size, m.state_dim, m.head_dim
        per_head = Q * (N + P) + 4 * N * P
        fwd += spec.mamba_heads * per_head * (2 if m.version == 3 else 1)
    elif letter == "R":
        r = spec.recurrent
        fwd += r.num_heads * (r.chunk_size * (2 * r.key_dim + r.value_dim) + 6 * r.key_dim * r.value_dim)
    return 3.0 * fwd


def layer_rows(recipe: Recipe) -> list[LayerRow]:
    spec = recipe.model
    rows = []
    for layer in recipe.layers.layers:
        seam = spec.norm.seams["A" if layer.letter == "D" else layer.letter]
        norm_p = (2 if spec.norm.kind == "layernorm" else 1) * spec.hidden_size if seam == "pre" else 0
        sub_p = sum(numel(s) for s in sublayer_shapes(spec, layer.letter).values())
        rows.append(LayerRow(
            layer.index, layer.letter, layer.family, variant(spec, layer.letter), seam,
            norm_p + sub_p, norm_p + sublayer_active_params(spec, layer.letter),
            sublayer_flops(spec, layer.letter, recipe.policy.seq_len)))
    return rows


def _act_elems(spec: ModelSpec, letter: str) -> float:
    """Elements saved for backward per token in one layer (a coarse estimate)."""
    d = spec.hidden_size
    base = 2 * d  # residual input + normed input
    if letter in "AD":
        a = spec.attention
        if a.kind == "gqa":
            hd = spec.attn_head_dim
            qkv = (a.num_heads + 2 * a.num_kv_heads) * hd
            out = a.num_heads * hd
        else:
            qkv = a.num_heads * (2 * (a.qk_head_dim + a.qk_rope_dim) + a.v_head_dim) + a.kv_lora_rank
            out = a.num_heads * a.v_head_dim
        return base + qkv + 2 * out
    if letter == "M":
        di, G, N = spec.mamba_d_inner, spec.mamba.num_groups, spec.mamba.state_dim
        return base + 5 * di + 4 * G * N
    if letter == "R":
        r = spec.recurrent
        qk, v = r.num_heads * r.key_dim, r.num_heads * r.value_dim
        return base + 4 * qk + 5 * v
    if letter == "E":
        e = spec.moe
        return base + e.top_k * 3 * e.expert_ffn + 3 * e.shared_ffn + 2 * e.num_experts
    return base + 3 * spec.ffn_size


@dataclass(frozen=True)
class Summary:
    total_params: int
    active_params: int
    embedding_params: int
    flops_per_token: float            # training FLOPs per token, whole model
    flops_by_family: dict[str, float]
    memory: dict[str, float]          # bytes, estimates


def summarize(recipe: Recipe, rows: list[LayerRow] | None = None) -> Summary:
    spec, pol = recipe.model, recipe.policy
    rows = rows if rows is not None else layer_rows(recipe)
    shapes = model_shapes(spec)
    total = sum(numel(s) for s in shapes.values())
    d, V = spec.hidden_size, spec.vocab_size
    inactive = sum(r.params - r.active_params for r in rows)
    # MTP depths: their layers' inactive experts too
    for _ in range(spec.mtp.depths):
        for c in mtp_letters(spec):
            full = sum(numel(s) for s in sublayer_shapes(spec, c).values())
            inactive += full - sublayer_active_params(spec, c)
    active = total - inactive
    by_family: dict[str, float] = {}
    for r in rows:
        by_family[r.family] = by_family.get(r.family, 0.0) + r.flops_per_token
    by_family["head"] = 6.0 * V * d
    if spec.mtp.depths:
        mtp = 0.0
        for c in mtp_letters(spec):
            mtp += sublayer_flops(spec, c, pol.seq_len)
        by_family["mtp"] = spec.mtp.depths * (mtp + 6.0 * (2 * d * d + V * d))
    flops = sum(by_family.values())

    pbytes = DTYPE_BYTES[pol.precision.params]
    cbytes = DTYPE_BYTES[pol.precision.compute]
    tokens = pol.micro_batch * pol.seq_len
    act_full = sum(_act_elems(spec, r.letter) for r in rows) * tokens * cbytes
    act_ckpt = (len(rows) * d + max(_act_elems(spec, r.letter) for r in rows)) * tokens * cbytes
    chunk = min(tokens, 4096)
    memory = {
        "weights": float(total * pbytes),
        "gradients": float(total * pbytes),
        "optimizer": float(total * 8),     # AdamW m and v in float32
        "activations": float(act_full),
        "activations_checkpointed": float(act_ckpt),
        # logits + their gradient in float32: naive head vs chunked linear-CE
        "logits_naive": float(tokens * V * 4 * 2),
        "logits_linear_ce": float(chunk * V * 4 * 2),
    }
    memory["total_estimate"] = (memory["weights"] + memory["gradients"] + memory["optimizer"]
                                + memory["activations"] + memory["logits_linear_ce"])
    memory["total_estimate_checkpointed"] = (memory["total_estimate"] - memory["activations"]
                                             + memory["activations_checkpointed"])
    memory.update(_device_memory(spec, pol, rows, memory, tokens, pbytes, cbytes))
    return Summary(total, active, V * d * (1 if spec.tie_embeddings else 2), flops, by_family, memory)


def _device_memory(spec: ModelSpec, pol, rows, memory: dict, tokens: int, pbytes: int, cbytes: int) -> dict:
    """One device's share under this recipe's layout and checkpointing policy.

    FSDP2 over N ranks keeps 1/N of weights, gradients and optimizer state,
    plus the unsharded parameters of the group of layers running and of the
    one being prefetched (or of every group, policy.parallel.reshard_after_forward
    false). A layer checkpointed (full or selective) keeps its input and
    rebuilds the rest during its backward: the largest such layer's
    activations are counted once on top.
    """
    from .pattern import FAMILY_KEY

    ac = pol.activation_checkpointing
    sharded = pol.parallel.sharding == "fsdp2" and pol.parallel.data > 1
    world = pol.parallel.data if sharded else 1
    kept = recompute = 0.0
    for r in rows:
        full = _act_elems(spec, r.letter)
        if ac.get(FAMILY_KEY[r.letter], "none") == "none":
            kept += full
        else:
            kept += spec.hidden_size
            recompute = max(recompute, full)
    states = (memory["weights"] + memory["gradients"] + memory["optimizer"]) / world
    gather = 0.0
    if sharded:
        # gathered in the storage dtype, or (gather "compute"/"compute_subgroups")
        # mostly in the compute dtype: the GEMM weights are nearly all of a layer
        gbytes = pbytes if pol.parallel.gather == "storage" else min(pbytes, cbytes)
        k = max(1, pol.parallel.group_layers)
        groups = [sum(r.params for r in rows[i:i + k]) for i in range(0, len(rows), k)]
        # resharding after forward: the group running and the one prefetched;
        # otherwise every group stays gathered from its forward to its backward
        gather = (2 * max(groups) if pol.parallel.reshard_after_forward else sum(groups)) * gbytes
    act = (kept + recompute) * tokens * cbytes
    return {"device_states": states, "device_gather": float(gather), "device_activations": act,
            "device_estimate": states + gather + act + memory["logits_linear_ce"], "device_shards": world}


def describe(recipe: Recipe) -> dict:
    """Everything `megacpp describe --json` prints."""
    rows = layer_rows(recipe)
    s = summarize(recipe, rows)
    counts = recipe.layers.counts()
    return {
        "recipe": recipe.model.name,
        "hash": recipe.hash,
        "source": recipe.source,
        "pattern": recipe.model.pattern,
        "resolved_pattern": recipe.layers.with_stages(),
        "depth": recipe.model.depth,
        "layer_counts": {k: v for k, v in counts.items() if v},
        "family_counts": recipe.layers.family_counts(),
        "overrides": {str(k): v for k, v in sorted(recipe.model.overrides.items())},
        "layers": [r.__dict__ for r in rows],
        "total_params": s.total_params,
        "active_params": s.active_params,
        "embedding_params": s.embedding_params,
        "seq_len": recipe.policy.seq_len,
        "flops_per_token": s.flops_per_token,
        "flops_by_family": s.flops_by_family,
        "memory_estimate_bytes": s.memory,
        "micro_batch": recipe.policy.micro_batch,
        "low_precision": _low_precision_plan(recipe),
    }


def _low_precision_plan(recipe: Recipe) -> dict | None:
    # deferred: the plan builds the model (on meta tensors), which imports torch
    from ..train.lowp import conversion_plan_summary
    return conversion_plan_summary(recipe)


def fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def describe_text(recipe: Recipe) -> str:
    info = describe(recipe)
    lines = [f"recipe {info['recipe']}  hash {info['hash'][:16]}  ({info['source']})",
             f"pattern {info['pattern']} at depth {info['depth']} -> {info['resolved_pattern']}",
             "layers " + ", ".join(f"{v} {k}" for k, v in info["layer_counts"].items())]
    if info["overrides"]:
        lines.append("overrides " + ", ".join(f"{k}:{v}" for k, v in info["overrides"].items()))
    lines.append("")
    lines.append(f"{'idx':>4} {'L':1} {'family':10} {'variant':28} {'seam':5} {'params':>10} "
                 f"{'active':>10} {'MFLOP/tok':>10}")
    for r in info["layers"]:
        lines.append(f"{r['index']:>4} {r['letter']:1} {r['family']:10} {r['variant']:28} "
                     f"{r['norm_seam']:5} {fmt_count(r['params']):>10} "
                     f"{fmt_count(r['active_params']):>10} {r['flops_per_token'] / 1e6:>10.2f}")
    lines.append("")
    lines.append(f"parameters: total {fmt_count(info['total_params'])} ({info['total_params']:,}), "
                 f"active per token {fmt_count(info['active_params'])}, "
                 f"embedding+head {fmt_count(info['embedding_params'])}")
    lines.append(f"training FLOPs per token at seq {info['seq_len']}: "
                 f"{info['flops_per_token'] / 1e9:.3f} GFLOP  ("
                 + ", ".join(f"{k} {v / 1e9:.3f}" for k, v in info["flops_by_family"].items()) + ")")
    mem = info["memory_estimate_bytes"]
    lines.append(f"memory estimate at micro batch {info['micro_batch']}: weights "
                 f"{fmt_bytes(mem['weights'])}, grads {fmt_bytes(mem['gradients'])}, "
                 f"optimizer {fmt_bytes(mem['optimizer'])}, activations {fmt_bytes(mem['activations'])} "
                 f"({fmt_bytes(mem['activations_checkpointed'])} with full checkpointing), logits "
                 f"{fmt_bytes(mem['logits_naive'])} naive / {fmt_bytes(mem['logits_linear_ce'])} linear-CE")
    lines.append(f"total estimate {fmt_bytes(mem['total_estimate'])} "
                 f"({fmt_bytes(mem['total_estimate_checkpointed'])} with full checkpointing)")
    lines.append(f"per device under this layout and checkpointing policy: "
                 f"{fmt_bytes(mem['device_estimate'])} (states / {mem['device_shards']} "
                 f"{fmt_bytes(mem['device_states'])}, gathered layers {fmt_bytes(mem['device_gather'])}, "
                 f"activations {fmt_bytes(mem['device_activations'])})")
    lp = info["low_precision"]
    if lp:
        what = lp["recipe"] + (f", experts {lp['experts']}" if lp.get("experts", "none") != "none" else "")
        lines.append(f"low-precision GEMMs ({what}): {lp['converted']} converted, {lp['kept']} kept; "
                     f"the converted carry {lp['converted_flops_per_token'] / 1e9:.3f} GFLOP/token, "
                     f"{lp['share_of_model_flops'] * 100:.0f}% of the model's training FLOPs (the most "
                     f"a faster GEMM can act on)")
    return "\n".join(lines)
