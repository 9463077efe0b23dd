"""Semantic checks on a typed recipe: one RecipeError naming the field.

Type and unknown-key errors are raised earlier, by `io.from_dict`. What
this module checks is that the values make a buildable model and a runnable
policy, and that nothing asks for a feature this version does not build.
"""
from __future__ import annotations

import re

from ..errors import RecipeError
from .pattern import _clean, parse_pattern
from .policy import RunPolicy
from .spec import ModelSpec

# What this version implements; a recipe asking for more is an error, not a
# silent ignore. Later work extends these sets.
IMPLEMENTED = {
    "norm.kind": {"rmsnorm", "layernorm"},
    "attention.kind": {"gqa", "mla"},
    "mamba.version": {2, 3},
    "moe.score": {"softmax", "sigmoid"},
    "moe.routing": {"token_choice", "expert_choice"},
    "recurrent.kind": {"gated_deltanet"},
    "activation": {"swiglu", "geglu", "gelu", "relu2"},
    "optimizer.name": {"adamw", "muon"},
    "schedule.kind": {"cosine", "wsd", "constant"},
    "precision.compute": {"fp32", "bf16", "fp16"},
    "precision.params": {"fp32", "bf16"},
    "precision.residual": {"fp32", "compute"},
    "precision.low_precision": {"none", "fp8_rowwise", "fp8_tensorwise", "nvfp4_emulated"},
    "precision.expert_low_precision": {"none", "fp8_rowwise", "fp8_rowwise_wgrad"},
    "precision.fp32_matmul": {"tf32", "ieee"},
    "compile.mode": {"none", "default", "reduce-overhead", "max-autotune", "auto"},
    "compile.scope": {"block", "model", "auto"},
    "kernels.ssd_states": {"recompute", "keep"},
    "kernels.delta_states": {"recompute", "keep"},
    "kernels.mamba_in_proj": {"one", "split"},
    "kernels.moe_gate": {"combine", "activation"},
    "parallel.sharding": {"none", "ddp", "fsdp2"},
    "parallel.gather": {"storage", "compute", "compute_subgroups"},
    "parallel.reduce": {"float32", "compute"},
    "ac": {"none", "full", "selective"},
    "patch_mode": {"required", "preferred", "off"},
    "stp.form": {"curvature", "span"},
}
KNOWN_PATCHES = ("linear_ce", "dsa_indexer_fused")
FAMILY_KEYS = ("A", "M", "R", "E", "F")
# Sizes beyond these are typos, not models this stack trains.
MAX_DIM = 1 << 17
MAX_VOCAB = 1 << 22
MAX_DEPTH = 1024
MAX_SEQ = 1 << 20


def _err(field: str, msg: str):
    raise RecipeError(msg, field)


def _choice(value, allowed: set, field: str):
    if value not in allowed:
        _err(field, f"must be one of {', '.join(sorted(map(str, allowed)))}; got {value!r}")


def _pos(value, field: str, maximum: int | None = None):
    if value <= 0:
        _err(field, f"must be positive, got {value}")
    if maximum is not None and value > maximum:
        _err(field, f"{value} is beyond the supported maximum {maximum}")


def _nonneg(value, field: str):
    if value < 0:
        _err(field, f"must be >= 0, got {value}")


def _family_map(m: dict, field: str, allowed: set):
    for k, v in m.items():
        if k not in FAMILY_KEYS:
            _err(f"{field}.{k}", f"unknown family letter; allowed: {', '.join(FAMILY_KEYS)} (D uses A's)")
        _choice(v, allowed, f"{field}.{k}")
    missing = [k for k in FAMILY_KEYS if k not in m]
    if missing:
        _err(field, f"missing families {', '.join(missing)}")


def validate_model(m: ModelSpec, seq_len: int | None = None) -> None:
    f = "model."
    if not m.name:
        _err(f + "name", "must not be empty")
    _pos(m.vocab_size, f + "vocab_size", MAX_VOCAB)
    _pos(m.hidden_size, f + "hidden_size", MAX_DIM)
    _pos(m.depth, f + "depth", MAX_DEPTH)
    _pos(m.ffn_size, f + "ffn_size", MAX_DIM * 8)
    _pos(m.init_std, f + "init_std")
    _choice(m.activation, IMPLEMENTED["activation"], f + "activation")
    parsed = parse_pattern(m.pattern, m.depth, m.overrides)
    letters = set(parsed.letters)
    _nonneg(m.mtp.depths, f + "mtp.depths")
    if m.mtp.depths:
        if "|" in m.mtp.pattern:
            _err(f + "mtp.pattern", "an MTP depth cannot hold pipeline boundaries")
        mtp_letters, _ = _clean(m.mtp.pattern, f + "mtp.pattern")
        letters |= set(mtp_letters)  # MTP layers use the same family settings

    n = m.norm
    _choice(n.kind, IMPLEMENTED["norm.kind"], f + "norm.kind")
    _pos(n.eps, f + "norm.eps")
    _family_map(n.seams, f + "norm.seams", {"pre", "none"})
    if "M" in letters and m.mamba.version == 3 and n.seams["M"] != "pre":
        _err(f + "norm.seams.M", "Mamba-3 has no input norm of its own: its seam must be 'pre' "
             "(without it the seed system saw NaN gradient norms from the first step)")

    a = m.attention
    fa = f + "attention."
    if letters & {"A", "D"}:
        _choice(a.kind, IMPLEMENTED["attention.kind"], fa + "kind")
        _pos(a.num_heads, fa + "num_heads", 4096)
        if m.hidden_size % a.num_heads:
            _err(fa + "num_heads", f"{a.num_heads} heads do not divide hidden_size {m.hidden_size}")
        _pos(a.rope_theta, fa + "rope_theta")
        if a.kind == "gqa":
            _pos(a.num_kv_heads, fa + "num_kv_heads", 4096)
            if a.num_heads % a.num_kv_heads:
                _err(fa + "num_kv_heads", f"GQA groups: {a.num_kv_heads} KV heads do not divide "
                     f"{a.num_heads} query heads")
            _nonneg(a.head_dim, fa + "head_dim")
            if not 0.0 < a.rotary_fraction <= 1.0:
                _err(fa + "rotary_fraction", f"must be in (0, 1], got {a.rotary_fraction}")
            if m.rotary_dim < 2:
                _err(fa + "rotary_fraction", "rotates fewer than 2 dims per head")
            if m.attn_head_dim % 2:
                _err(fa + "head_dim", f"head dim {m.attn_head_dim} must be even for RoPE")
        else:
            _nonneg(a.q_lora_rank, fa + "q_lora_rank")
            _pos(a.kv_lora_rank, fa + "kv_lora_rank", MAX_DIM)
            _pos(a.qk_head_dim, fa + "qk_head_dim", 4096)
            _pos(a.qk_rope_dim, fa + "qk_rope_dim", 4096)
            _pos(a.v_head_dim, fa + "v_head_dim", 4096)
            if a.qk_rope_dim % 2:
                _err(fa + "qk_rope_dim", f"must be even for RoPE, got {a.qk_rope_dim}")
    if "D" in letters:
        _pos(a.index_heads, fa + "index_heads", 1024)
        _pos(a.index_head_dim, fa + "index_head_dim", 4096)
        _pos(a.index_topk, fa + "index_topk")
        if seq_len is not None and a.index_topk > seq_len:
            _err(fa + "index_topk", f"DSA top-k {a.index_topk} is above the sequence length {seq_len}")

    mb = m.mamba
    fm = f + "mamba."
    if "M" in letters:
        _choice(mb.version, IMPLEMENTED["mamba.version"], fm + "version")
        _pos(mb.state_dim, fm + "state_dim", 4096)
        _pos(mb.head_dim, fm + "head_dim", 4096)
        _pos(mb.expand, fm + "expand", 16)
        _pos(mb.num_groups, fm + "num_groups", 4096)
        _pos(mb.chunk_size, fm + "chunk_size", 4096)
        if m.mamba_d_inner % mb.head_dim:
            _err(fm + "head_dim", f"head_dim {mb.head_dim} does not divide d_inner "
                 f"{m.mamba_d_inner} (expand * hidden_size)")
        if m.mamba_heads % mb.num_groups:
            _err(fm + "num_groups", f"{mb.num_groups} groups do not divide {m.mamba_heads} Mamba heads")
        if mb.version == 2:
            _pos(mb.conv_width, fm + "conv_width", 64)
        if mb.version == 3 and mb.state_dim % 2:
            _err(fm + "state_dim", "Mamba-3 rotates state pairs: state_dim must be even")
        if mb.mimo_rank != 1:
            _err(fm + "mimo_rank", "Mamba-3 MIMO (rank > 1) is not implemented; use 1 (SISO)")
        if not 0.0 < mb.dt_min <= mb.dt_max:
            _err(fm + "dt_min", f"need 0 < dt_min <= dt_max, got {mb.dt_min}, {mb.dt_max}")

    e = m.moe
    fe = f + "moe."
    if "E" in letters:
        _pos(e.num_experts, fe + "num_experts", 4096)
        _pos(e.top_k, fe + "top_k")
        _nonneg(e.null_experts, fe + "null_experts")
        if e.top_k > e.num_experts + e.null_experts:
            _err(fe + "top_k", f"top-k {e.top_k} is above the number of experts "
                 f"{e.num_experts} (+{e.null_experts} null)")
        _pos(e.expert_ffn, fe + "expert_ffn", MAX_DIM * 8)
        _nonneg(e.shared_ffn, fe + "shared_ffn")
        _choice(e.score, IMPLEMENTED["moe.score"], fe + "score")
        _choice(e.routing, IMPLEMENTED["moe.routing"], fe + "routing")
        _nonneg(e.capacity_factor, fe + "capacity_factor")
        if e.routing == "expert_choice" and e.capacity_factor <= 0:
            _err(fe + "capacity_factor", "expert-choice routing needs capacity_factor > 0")
        if e.bias_balancing and e.score != "sigmoid":
            _err(fe + "bias_balancing", "aux-loss-free bias balancing is defined for sigmoid scores")

    r = m.recurrent
    fr = f + "recurrent."
    if "R" in letters:
        _choice(r.kind, IMPLEMENTED["recurrent.kind"], fr + "kind")
        _pos(r.num_heads, fr + "num_heads", 4096)
        _pos(r.key_dim, fr + "key_dim", 4096)
        _pos(r.value_dim, fr + "value_dim", 4096)
        _pos(r.conv_width, fr + "conv_width", 64)
        _pos(r.chunk_size, fr + "chunk_size", 4096)

def validate_policy(p: RunPolicy) -> None:
    f = "policy."
    _pos(p.seq_len, f + "seq_len", MAX_SEQ)
    _pos(p.micro_batch, f + "micro_batch", 1 << 16)
    _pos(p.global_batch, f + "global_batch", 1 << 24)
    _pos(p.steps, f + "steps", 1 << 40)
    _nonneg(p.seed, f + "seed")
    _pos(p.parallel.data, f + "parallel.data", 1 << 16)
    per_step = p.micro_batch * p.parallel.data
    if p.global_batch % per_step:
        _err(f + "global_batch", f"{p.global_batch} is not a multiple of micro_batch x data-parallel "
             f"degree = {p.micro_batch} x {p.parallel.data}")
    o = p.optimizer
    _choice(o.name, IMPLEMENTED["optimizer.name"], f + "optimizer.name")
    _pos(o.lr, f + "optimizer.lr")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        _err(f + "optimizer.min_lr_ratio", f"must be in [0, 1], got {o.min_lr_ratio}")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            _err(f + f"optimizer.{name}", f"must be in [0, 1), got {getattr(o, name)}")
    _pos(o.eps, f + "optimizer.eps")
    _nonneg(o.weight_decay, f + "optimizer.weight_decay")
    _nonneg(o.grad_clip, f + "optimizer.grad_clip")
    _pos(o.muon_lr, f + "optimizer.muon_lr")
    s = p.schedule
    _choice(s.kind, IMPLEMENTED["schedule.kind"], f + "schedule.kind")
    _nonneg(s.warmup_steps, f + "schedule.warmup_steps")
    if not 0.0 <= s.decay_fraction <= 1.0:
        _err(f + "schedule.decay_fraction", f"must be in [0, 1], got {s.decay_fraction}")
    pr = p.precision
    _choice(pr.compute, IMPLEMENTED["precision.compute"], f + "precision.compute")
    _choice(pr.params, IMPLEMENTED["precision.params"], f + "precision.params")
    _choice(pr.residual, IMPLEMENTED["precision.residual"], f + "precision.residual")
    _choice(pr.low_precision, IMPLEMENTED["precision.low_precision"], f + "precision.low_precision")
    _choice(pr.fp32_matmul, IMPLEMENTED["precision.fp32_matmul"], f + "precision.fp32_matmul")
    if pr.params == "bf16" and pr.compute != "bf16":
        _err(f + "precision.params", f"bf16 parameters need compute = \"bf16\" (compute is {pr.compute!r})")
    if pr.low_precision.startswith("fp8") and pr.compute != "bf16":
        _err(f + "precision.low_precision", f"{pr.low_precision} runs its GEMMs from bf16 autocast: "
             f"set policy.precision.compute = \"bf16\" (it is {pr.compute!r})")
    _choice(pr.expert_low_precision, IMPLEMENTED["precision.expert_low_precision"],
            f + "precision.expert_low_precision")
    if pr.expert_low_precision != "none" and pr.compute != "bf16":
        _err(f + "precision.expert_low_precision", f"{pr.expert_low_precision} quantizes the experts' bf16 "
             f"GEMM inputs: set policy.precision.compute = \"bf16\" (it is {pr.compute!r})")
    _nonneg(pr.min_gemm_size, f + "precision.min_gemm_size")
    _pos(pr.loss_scale_init, f + "precision.loss_scale_init")
    _pos(pr.loss_scale_growth_interval, f + "precision.loss_scale_growth_interval")
    _family_map(p.activation_checkpointing, f + "activation_checkpointing", IMPLEMENTED["ac"])
    _choice(p.compile.mode, IMPLEMENTED["compile.mode"], f + "compile.mode")
    _choice(p.compile.scope, IMPLEMENTED["compile.scope"], f + "compile.scope")
    _choice(p.kernels.ssd_states, IMPLEMENTED["kernels.ssd_states"], f + "kernels.ssd_states")
    _choice(p.kernels.delta_states, IMPLEMENTED["kernels.delta_states"], f + "kernels.delta_states")
    _choice(p.kernels.mamba_in_proj, IMPLEMENTED["kernels.mamba_in_proj"], f + "kernels.mamba_in_proj")
    _choice(p.kernels.moe_gate, IMPLEMENTED["kernels.moe_gate"], f + "kernels.moe_gate")
    w = p.kernels.moe_wgrad_splits
    if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= 16:
        _err(f + "kernels.moe_wgrad_splits", f"expected an integer from 1 to 16, got {w!r}")
    for name, mode in p.patches.items():
        if name not in KNOWN_PATCHES:
            _err(f + f"patches.{name}", f"unknown patch; known: {', '.join(KNOWN_PATCHES)}")
        _choice(mode, IMPLEMENTED["patch_mode"], f + f"patches.{name}")
    par = p.parallel
    _pos(par.data, f + "parallel.data", 1 << 16)
    _choice(par.sharding, IMPLEMENTED["parallel.sharding"], f + "parallel.sharding")
    if p.compile.mode == "reduce-overhead" and par.sharding != "none":
        # FSDP2 gathers each layer's weights into fresh storage every step (cudagraph
        # trees would re-record), and neither DDP nor FSDP2 has run with CUDA graphs here
        _err(f + "compile.mode", f"\"reduce-overhead\" (CUDA graphs) runs on one device only; with "
             f"policy.parallel.sharding = {par.sharding!r} set policy.compile.mode = \"default\"")
    _pos(par.group_layers, f + "parallel.group_layers", 1 << 16)
    _choice(par.gather, IMPLEMENTED["parallel.gather"], f + "parallel.gather")
    _nonneg(par.prefetch_groups, f + "parallel.prefetch_groups")
    _choice(par.reduce, IMPLEMENTED["parallel.reduce"], f + "parallel.reduce")
    if par.reduce == "compute" and pr.compute != "bf16":
        # fp16 gradients carry the loss scale: a sum in fp16 overflows where float32 does not
        _err(f + "parallel.reduce", f"\"compute\" reduces gradients in bf16 and needs "
             f"policy.precision.compute = \"bf16\" (it is {pr.compute!r}); use \"float32\"")
    if not isinstance(par.reshard_after_forward, bool):
        _err(f + "parallel.reshard_after_forward", f"must be true or false, got {par.reshard_after_forward!r}")
    for dim in ("tensor", "context", "expert", "pipeline"):
        v = getattr(par, dim)
        _pos(v, f + f"parallel.{dim}", 1 << 16)
        if v != 1:
            _err(f + f"parallel.{dim}", f"{dim} parallelism is not implemented yet (degree {v}); use 1")
    st = p.aux.stp
    _choice(st.form, IMPLEMENTED["stp.form"], f + "aux.stp.form")
    _pos(st.n_spans, f + "aux.stp.n_spans", 4096)
    stp_layers(st.layers, None)
    for name in ("stp", "moe", "dsa", "mtp"):
        aux = getattr(p.aux, name)
        _nonneg(aux.weight, f + f"aux.{name}.weight")
        _nonneg(aux.start_step, f + f"aux.{name}.start_step")
        _nonneg(aux.warmup_steps, f + f"aux.{name}.warmup_steps")
    _nonneg(p.aux.moe.z_loss_weight, f + "aux.moe.z_loss_weight")
    _nonneg(p.aux.moe.bias_update_rate, f + "aux.moe.bias_update_rate")
    _nonneg(p.aux.dsa.dense_warmup_steps, f + "aux.dsa.dense_warmup_steps")
    _pos(p.eval_interval, f + "eval_interval")
    _nonneg(p.eval_batches, f + "eval_batches")
    _pos(p.checkpoint_interval, f + "checkpoint_interval")
    _pos(p.keep_checkpoints, f + "keep_checkpoints", 1000)
    _pos(p.log_interval, f + "log_interval")
    _pos(p.max_nonfinite_steps, f + "max_nonfinite_steps", 1 << 20)


def stp_layers(spec: str, depth: int | None) -> list[int] | str:
    """Parse policy.aux.stp.layers: "final" or comma-separated layer indices."""
    field = "policy.aux.stp.layers"
    if spec.strip() == "final":
        return "final"
    out = []
    for part in spec.split(","):
        part = part.strip()
        # ASCII digits only: str.isdigit() also passes "²", which int() refuses
        if not re.fullmatch(r"-?[0-9]+", part):
            _err(field, f"must be 'final' or comma-separated layer indices, got {spec!r}")
        i = int(part)
        if i < 0 or (depth is not None and i >= depth):
            _err(field, f"layer index {i} is outside the model (depth {depth})")
        out.append(i)
    if not out:
        _err(field, "no layers given")
    return out


def validate(model: ModelSpec, policy: RunPolicy) -> None:
    validate_model(model, policy.seq_len)
    validate_policy(policy)
    stp_layers(policy.aux.stp.layers, model.depth)
