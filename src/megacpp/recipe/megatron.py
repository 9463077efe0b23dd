"""Translation of a recipe into Megatron-LM's launcher flags, failing closed.

Megatron's hybrid pattern has one symbol per layer: `M` Mamba-2, `*`
attention, `-` MLP, `E` MoE, `G` Gated DeltaNet, `D` DSA, `+` MLA, `|`
pipeline-stage boundary, `/` separating MTP depths (shared/FACTS.md §1).
Whatever Megatron cannot express is not dropped silently: it is listed as a
translation issue, and `--strict` turns any issue into a failure.
"""
from __future__ import annotations

from dataclasses import dataclass

from .pattern import parse_pattern
from .recipe import Recipe
from .shapes import mtp_letters


@dataclass(frozen=True)
class Translation:
    args: list[str]
    issues: list[str]


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


def _symbol(recipe: Recipe, letter: str, issues: set[str]) -> str:
    m = recipe.model
    if letter == "A":
        return "+" if m.attention.kind == "mla" else "*"
    if letter == "D":
        if m.attention.kind != "mla":
            issues.add("D (DSA) with GQA attention: Megatron's DSA is built on MLA; "
                       "GQA mixed with DSA cannot be expressed")
        return "D"
    if letter == "M":
        if m.mamba.version == 3:
            issues.add("M is Mamba-3 (trapezoidal update, rotary B/C, no conv): Megatron's `M` is "
                       "Mamba-2; needs a custom layer spec")
        return "M"
    if letter == "R":
        if m.recurrent.kind != "gated_deltanet":
            issues.add(f"R recurrent kind {m.recurrent.kind!r} has no Megatron layer")
        return "G"
    if letter == "E":
        return "E"
    return "-"


def megatron_pattern(recipe: Recipe, issues: set[str]) -> str:
    layers = recipe.layers
    out = []
    for layer in layers.layers:
        if layer.index in layers.stage_boundaries:
            out.append("|")
        out.append(_symbol(recipe, layer.letter, issues))
    for _ in range(recipe.model.mtp.depths):
        out.append("/")
        mtp = parse_pattern(mtp_letters(recipe.model), len(mtp_letters(recipe.model)),
                            field="model.mtp.pattern")
        out.extend(_symbol(recipe, l.letter, issues) for l in mtp.layers)
    return "".join(out)


def translate(recipe: Recipe) -> Translation:
    m, p = recipe.model, recipe.policy
    issues: set[str] = set()
    pattern = megatron_pattern(recipe, issues)
    a, mb, e, r = m.attention, m.mamba, m.moe, m.recurrent
    letters = set(recipe.layers.letters) | set(mtp_letters(m) if m.mtp.depths else "")
    kinds = set(pattern) - {"|", "/"}
    if "*" in kinds and kinds & {"D", "+"}:
        issues.add("Megatron does not allow `*` (GQA attention) mixed with `D` or `+` in one pattern")

    args: list[str] = [
        "--hybrid-layer-pattern", pattern,
        "--num-layers", str(m.depth),
        "--hidden-size", str(m.hidden_size),
        "--ffn-hidden-size", str(m.ffn_size),
        "--vocab-size", str(m.vocab_size),
        "--seq-length", str(p.seq_len),
        "--max-position-embeddings", str(p.seq_len),
        "--normalization", {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[m.norm.kind],
        "--norm-epsilon", _num(m.norm.eps),
        "--init-method-std", _num(m.init_std),
        "--disable-bias-linear",
    ]
    if any(v != "pre" for v in m.norm.seams.values()):
        issues.add("a family without a pre-norm seam: Megatron's layers always normalise their input")
    act = m.activation
    if act == "swiglu":
        args.append("--swiglu")
    elif act == "relu2":
        args.append("--squared-relu")
    elif act == "geglu":
        issues.add("GeGLU activation has no Megatron flag")
    if not m.tie_embeddings:
        args.append("--untie-embeddings-and-output-weights")

    if letters & {"A", "D"}:
        args += ["--num-attention-heads", str(a.num_heads),
                 "--position-embedding-type", "rope",
                 "--rotary-base", _num(int(a.rope_theta) if a.rope_theta.is_integer() else a.rope_theta)]
        if a.kind == "gqa":
            args += ["--group-query-attention", "--num-query-groups", str(a.num_kv_heads),
                     "--kv-channels", str(m.attn_head_dim),
                     "--rotary-percent", _num(a.rotary_fraction)]
            if a.qk_norm:
                args.append("--qk-layernorm")
        else:
            args += ["--multi-latent-attention",
                     "--kv-lora-rank", str(a.kv_lora_rank),
                     "--qk-head-dim", str(a.qk_head_dim),
                     "--qk-pos-emb-head-dim", str(a.qk_rope_dim),
                     "--v-head-dim", str(a.v_head_dim)]
            if a.q_lora_rank:
                args += ["--q-lora-rank", str(a.q_lora_rank)]
        if "D" in letters:
            args += ["--dsa-indexer-n-heads", str(a.index_heads),
                     "--dsa-indexer-head-dim", str(a.index_head_dim),
                     "--dsa-indexer-topk", str(a.index_topk),
                     "--dsa-indexer-loss-coeff", _num(p.aux.dsa.weight if p.aux.dsa.enabled else 0.0)]
            if p.aux.dsa.dense_warmup_steps:
                issues.add("DSA dense warm-up stage (indexer-only training) has no Megatron flag")
    else:
        args += ["--position-embedding-type", "none"]

    if "M" in letters:
        args += ["--mamba-num-heads", str(m.mamba_heads),
                 "--mamba-head-dim", str(mb.head_dim),
                 "--mamba-state-dim", str(mb.state_dim),
                 "--mamba-num-groups", str(mb.num_groups)]
        if mb.version == 2 and mb.conv_width != 4:
            issues.add(f"Mamba conv width {mb.conv_width}: Megatron's Mamba layer fixes d_conv=4")
    if "R" in letters:
        args += ["--linear-attention-type", "gated_delta_net",
                 "--linear-num-key-heads", str(r.num_heads),
                 "--linear-num-value-heads", str(r.num_heads),
                 "--linear-key-head-dim", str(r.key_dim),
                 "--linear-value-head-dim", str(r.value_dim),
                 "--linear-conv-kernel-dim", str(r.conv_width)]
    if "E" in letters:
        args += ["--num-experts", str(e.num_experts),
                 "--moe-router-topk", str(e.top_k),
                 "--moe-ffn-hidden-size", str(e.expert_ffn),
                 "--moe-router-score-function", e.score,
                 "--moe-grouped-gemm",
                 "--moe-token-dispatcher-type", "alltoall"]
        if e.shared_ffn:
            args += ["--moe-shared-expert-intermediate-size", str(e.shared_ffn)]
        if e.bias_balancing:
            args += ["--moe-router-enable-expert-bias",
                     "--moe-router-bias-update-rate", _num(p.aux.moe.bias_update_rate)]
        lb = p.aux.moe
        if lb.enabled and lb.weight > 0:
            args += ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", _num(lb.weight)]
        else:
            args += ["--moe-router-load-balancing-type", "none"]
        if lb.enabled and lb.z_loss_weight > 0:
            args += ["--moe-z-loss-coeff", _num(lb.z_loss_weight)]
        if e.capacity_factor > 0:
            args += ["--moe-expert-capacity-factor", _num(e.capacity_factor), "--moe-token-drop-policy", "probs"]
        if e.null_experts:
            issues.add("null (no-op) experts have no Megatron flag")
        if e.routing == "expert_choice":
            issues.add("expert-choice routing has no Megatron flag (Megatron routes token-choice)")
        if lb.start_step or lb.warmup_steps:
            issues.add("MoE aux-loss start step / warm-up has no Megatron flag")
    if m.mtp.depths:
        args += ["--mtp-num-layers", str(m.mtp.depths),
                 "--mtp-loss-scaling-factor", _num(p.aux.mtp.weight if p.aux.mtp.enabled else 0.0)]

    # precision
    pr = p.precision
    if pr.compute == "bf16":
        args.append("--bf16")
    elif pr.compute == "fp16":
        args += ["--fp16", "--initial-loss-scale", _num(pr.loss_scale_init),
                 "--loss-scale-window", str(pr.loss_scale_growth_interval)]
    if pr.compute != "fp32" and pr.residual == "fp32":
        # Megatron keeps the stream in the compute dtype unless told
        args.append("--fp32-residual-connection")
    if pr.low_precision in ("fp8_rowwise", "fp8_tensorwise"):
        args += ["--fp8-format", "hybrid",
                 "--fp8-recipe", "tensorwise" if pr.low_precision == "fp8_tensorwise" else "blockwise"]
        if pr.low_precision == "fp8_rowwise":
            issues.add("FP8 rowwise scaling maps to Megatron's blockwise recipe only approximately")
    elif pr.low_precision == "nvfp4_emulated":
        issues.add("emulated NVFP4 (quantize-dequantize on Hopper) has no Megatron flag")
    fp8_dense = pr.low_precision in ("fp8_rowwise", "fp8_tensorwise")
    if "E" in letters and fp8_dense != (pr.expert_low_precision != "none"):
        # Megatron's --fp8-format covers the grouped experts with the other GEMMs
        issues.add("Megatron's FP8 runs the grouped experts with the dense GEMMs; here "
                   f"low_precision={pr.low_precision} and expert_low_precision={pr.expert_low_precision} differ")

    # parallel layout
    par = p.parallel
    args += ["--tensor-model-parallel-size", str(par.tensor),
             "--pipeline-model-parallel-size", str(par.pipeline),
             "--context-parallel-size", str(par.context),
             "--expert-model-parallel-size", str(par.expert)]
    if par.sharding == "fsdp2":
        args += ["--use-torch-fsdp2"]
        if not par.reshard_after_forward:
            args += ["--torch-fsdp2-no-reshard-after-forward"]
        if par.group_layers != 1:
            issues.add(f"parallel.group_layers={par.group_layers}: Megatron shards each layer on its own")
        if par.gather != "storage":
            issues.add(f"parallel.gather={par.gather} (GEMM weights gathered in the compute dtype) has no "
                       f"Megatron flag")
    elif par.data > 1:
        args += ["--use-distributed-optimizer"]
    if par.reduce == "compute":
        args += ["--grad-reduce-in-bf16"]
    if recipe.layers.stage_boundaries and par.pipeline != len(recipe.layers.stage_boundaries) + 1:
        issues.add(f"pattern has {len(recipe.layers.stage_boundaries) + 1} pipeline stages but "
                   f"parallel.pipeline is {par.pipeline}")

    # activation checkpointing: Megatron recomputes per layer, not per family
    ac = {k: v for k, v in p.activation_checkpointing.items()}
    modes = set(ac.values())
    if modes == {"full"}:
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                 "--recompute-num-layers", "1"]
    elif modes == {"selective"}:
        args += ["--recompute-granularity", "selective"]
    elif modes != {"none"}:
        issues.add("activation checkpointing differs per family: Megatron has one recompute policy")
    if p.compile.mode != "none":
        issues.add("torch.compile mode has no Megatron flag (Megatron uses fused kernels instead)")
    if p.compile.tune_kernels:
        issues.add("compile.tune_kernels (inductor's kernel tuning) has no Megatron flag")
    if p.compile.pdl:
        issues.add("compile.pdl (inductor's programmatic dependent launch) has no Megatron flag")
    if p.compile.combo_kernels:
        issues.add("compile.combo_kernels (inductor's horizontal fusion) has no Megatron flag")
    if p.kernels.ssd_states != "recompute":
        issues.add("kernels.ssd_states (megacpp's Triton scan keeping its chunk states) has no Megatron flag")
    if p.kernels.delta_states != "recompute":
        issues.add("kernels.delta_states (megacpp's Triton delta rule keeping its intermediates) "
                   "has no Megatron flag")
    if p.kernels.moe_wgrad_splits != 1:
        issues.add("kernels.moe_wgrad_splits (megacpp's experts' weight gradient in parts) has no Megatron flag")
    if p.kernels.moe_gate != "combine":
        issues.add("kernels.moe_gate (megacpp's MoE gates applied to the experts' activation) has no Megatron flag")
    if p.kernels.mamba_in_proj != "one":
        issues.add("kernels.mamba_in_proj (megacpp's Mamba in_proj as three GEMMs) has no Megatron flag")

    # batch, optimizer, schedule
    o, s = p.optimizer, p.schedule
    args += ["--micro-batch-size", str(p.micro_batch),
             "--global-batch-size", str(p.global_batch),
             "--train-iters", str(p.steps),
             "--seed", str(p.seed)]
    if o.name == "adamw":
        args += ["--optimizer", "adam"]
    else:
        args += ["--optimizer", "muon"]
        issues.add("Muon optimizer: only recent Megatron-LM builds have it")
    args += ["--lr", _num(o.lr), "--min-lr", _num(o.lr * o.min_lr_ratio),
             "--adam-beta1", _num(o.beta1), "--adam-beta2", _num(o.beta2), "--adam-eps", _num(o.eps),
             "--weight-decay", _num(o.weight_decay), "--clip-grad", _num(o.grad_clip),
             "--lr-warmup-iters", str(s.warmup_steps)]
    if s.kind == "cosine":
        args += ["--lr-decay-style", "cosine"]
    elif s.kind == "wsd":
        args += ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
                 "--lr-wsd-decay-iters", str(int(round(p.steps * s.decay_fraction)))]
    else:
        args += ["--lr-decay-style", "constant"]
    args += ["--eval-interval", str(p.eval_interval), "--eval-iters", str(p.eval_batches),
             "--save-interval", str(p.checkpoint_interval), "--log-interval", str(p.log_interval)]

    if p.aux.stp.enabled:
        issues.add("STP auxiliary loss is a megacpp run policy with no Megatron flag")
    return Translation(args, sorted(issues))
