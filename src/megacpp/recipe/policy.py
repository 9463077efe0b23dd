"""RunPolicy: how a model is trained, never what it is.

Auxiliary losses, memory patches, precision, activation checkpointing,
compile and parallel layout live here, so that switching one never changes
the model's identity (ModelSpec) — only the run's.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "adamw"              # adamw | muon (Muon on hidden 2-D matrices, AdamW elsewhere)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1        # final lr = lr * min_lr_ratio
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0           # 0: no clipping
    muon_lr: float = 0.02
    muon_momentum: float = 0.95


@dataclass(frozen=True)
class ScheduleSpec:
    kind: str = "cosine"             # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2      # wsd: last fraction of steps decays linearly


@dataclass(frozen=True)
class PrecisionSpec:
    compute: str = "bf16"            # fp32 | bf16 | fp16 (autocast dtype)
    params: str = "fp32"             # master weights
    # The residual stream between layers (the embedding's output and every
    # x + f(norm(x))): "fp32", or "compute" (the autocast dtype: half the
    # bytes in every norm, residual add and saved layer input; each add still
    # sums in float32 before one rounding, and norms take their statistics in
    # float32). Megatron-LM's default is the compute dtype; its
    # --fp32-residual-connection is "fp32".
    residual: str = "fp32"
    low_precision: str = "none"      # none | fp8_rowwise | fp8_tensorwise | nvfp4_emulated
    # The MoE experts' grouped GEMMs (not nn.Linear, so outside low_precision):
    # none | fp8_rowwise (forward and input gradient in FP8, weight gradient bf16)
    # | fp8_rowwise_wgrad (the weight gradient in FP8 too: one scale per expert
    # and column, each expert's rows padded to 16; ops.fp8_grouped.wgrad; 15% slower
    # than fp8_rowwise at nam-1b-fp8 on an H200, BENCHMARKS.md nineteenth session)
    expert_low_precision: str = "none"
    # Modules kept in float32 whatever the compute dtype (matched by name part).
    fp32_modules: tuple[str, ...] = ("A_log", "D", "dt_bias", "norm", "router")
    min_gemm_size: int = 0           # low-precision conversion skips smaller GEMMs (in*out)
    # float32 matmuls (reference scans, routers, anything outside autocast) on
    # CUDA: "tf32" uses the TF32 tensor cores (10-bit mantissa inputs,
    # float32 accumulate), "ieee" full float32. No effect on CPU.
    fp32_matmul: str = "tf32"
    loss_scale_init: float = 65536.0  # fp16 dynamic loss scaling
    loss_scale_growth_interval: int = 2000


@dataclass(frozen=True)
class CompileSpec:
    # none | default | reduce-overhead | max-autotune | auto (reduce-overhead on one
    # CUDA device, default under DDP/FSDP2 or off CUDA; run.json records what ran)
    mode: str = "none"
    scope: str = "block"             # block (each layer) | model | auto (model on one GPU)
    fullgraph: bool = False
    # inductor's coordinate-descent tuning of the launches of its own Triton
    # kernels (torch._inductor.config.coordinate_descent_tuning): each fused
    # kernel is timed at a few block sizes / warp counts while compiling, so
    # the compile takes longer. No effect off CUDA.
    tune_kernels: bool = False
    # Programmatic Dependent Launch for inductor's Triton kernels
    # (torch._inductor.config.triton.enable_pdl; Hopper and later): a kernel
    # may be launched while the one before it drains and waits in-kernel
    # before its first access, which hides part of the launch gap between
    # the thousands of kernels of a CUDA-graph step. Off where the GPU is
    # older than sm90 or torch's inductor has no such switch (the compile
    # record says why).
    pdl: bool = False
    # inductor's combo kernels (torch._inductor.config.combo_kernels):
    # independent small kernels of a graph launched as one horizontally
    # fused kernel: fewer launches, longer compiles.
    combo_kernels: bool = False


@dataclass(frozen=True)
class KernelSpec:
    # The Triton SSD scan's chunk states (and CB, the chunk cumsum) between
    # forward and backward: "recompute" them in the backward (saves memory:
    # the states are b * ceil(l/Q) * heads * headdim * state float32 a Mamba
    # layer, 100 MB for mamba2-130m at 8 x 2048) or "keep" them (the backward
    # skips two kernels and their glue). Changes no result.
    ssd_states: str = "recompute"
    # The project's Triton gated delta rule (R layers): "recompute" its
    # intermediates (T, Wk, the per-chunk states, W) in the backward, or
    # "keep" them from the forward (~0.45 GB a nam-125m layer, float32).
    # Changes no result; fla's kernels and the reference ignore it.
    delta_states: str = "recompute"
    # The MoE experts' weight gradient (grouped GEMM path) with each expert's
    # rows cut into this many parts, summed in float32: more GEMM tiles where
    # the experts are narrow (model.moe._GroupedMM). 1 is torch's own backward.
    # Changes the gradient's rounding only (one bf16 rounding per part).
    moe_wgrad_splits: int = 1
    # Mamba-2's in_proj as "one" GEMM whose output is split into z, xBC and dt,
    # or "split": three GEMMs over row slices of the same weight, so the
    # backward needs no concatenation of dz, dxBC and ddt (the gated norm's
    # backward can write dz where its GEMMs read it). Same parameters, same
    # function; a plain nn.Linear in_proj only (an FP8/NVFP4-converted one
    # keeps its own forward).
    mamba_in_proj: str = "one"
    # Where the MoE's gates weight the experts (model.moe.MoE.gate_in_activation):
    # "combine" multiplies each expert output by its gate as a token's slots are
    # summed; "activation" scales each row's activation by it before the
    # experts' second GEMM. The same function (the GEMM is linear in it), with
    # one rounding moved; "activation" keeps no expert outputs for the backward
    # and its gate gradient comes out of the activation's backward.
    moe_gate: str = "combine"


@dataclass(frozen=True)
class ParallelSpec:
    data: int = 1                    # data-parallel degree (1: one device)
    sharding: str = "none"           # none | ddp | fsdp2
    # fsdp2 only. Layers per fully_shard group: each group costs host time per
    # step (hooks, one all-gather per dtype, one reduce-scatter), so fewer,
    # larger groups trade peak memory for fewer host-side operations.
    group_layers: int = 1
    # fsdp2 only. False keeps each group's gathered weights from its forward
    # to its backward and across a step's micro-batches (one all-gather per
    # step; ZeRO-2-like memory).
    reshard_after_forward: bool = True
    # fsdp2 only. What each group's all-gather carries under bf16/fp16 autocast
    # over float32 storage:
    #   storage  every parameter in its storage dtype (float32): exact, the most bytes
    #   compute  the GEMM weights (plain Linear, MoE experts) in the compute
    #            dtype, which autocast rounds them to anyway: the same numbers,
    #            half the bytes; the layer's other parameters (norms, A_log, D,
    #            dt_bias, routers, convs) are not sharded but replicated, their
    #            gradients all-reduced once per step
    #   compute_subgroups  the GEMM weights in the compute dtype as a sub-group
    #            of their own: its hooks sit on modules inside the compiled
    #            layer and split its graph (nam-tiny: 4 -> 23 graphs, 26 breaks)
    gather: str = "storage"
    # fsdp2 only. Groups whose all-gather is issued from the CPU when the group
    # before them starts its forward (0: when their own forward starts)
    prefetch_groups: int = 1
    # ddp and fsdp2. The dtype gradients are averaged over the ranks in:
    # "float32", or "compute" (bf16 compute only: half the bytes; each rank's
    # gradient is rounded to bf16 before the sum, then stored in float32)
    reduce: str = "float32"
    tensor: int = 1
    context: int = 1
    expert: int = 1
    pipeline: int = 1


@dataclass(frozen=True)
class STPSpec:
    """Semantic Tube Prediction (Huang, LeCun, Balestriero, arXiv 2602.22617)."""
    enabled: bool = False
    weight: float = 0.05
    start_step: int = 0
    warmup_steps: int = 0            # linear ramp of the weight after start_step
    layers: str = "final"            # "final" or comma-separated layer indices, e.g. "11,23"
    form: str = "curvature"          # curvature (three-point) | span (paper form)
    n_spans: int = 4


@dataclass(frozen=True)
class MoEAuxSpec:
    enabled: bool = True
    weight: float = 1e-2             # switch-style load-balance loss
    z_loss_weight: float = 1e-3      # router z-loss
    bias_update_rate: float = 1e-3   # aux-loss-free balancing (when model.moe.bias_balancing)
    start_step: int = 0
    warmup_steps: int = 0


@dataclass(frozen=True)
class DSAAuxSpec:
    enabled: bool = True
    weight: float = 1.0
    dense_warmup_steps: int = 0      # dense stage: only the indexer learns
    start_step: int = 0
    warmup_steps: int = 0


@dataclass(frozen=True)
class MTPAuxSpec:
    enabled: bool = True
    weight: float = 0.3
    start_step: int = 0
    warmup_steps: int = 0


@dataclass(frozen=True)
class AuxSpec:
    stp: STPSpec = field(default_factory=STPSpec)
    moe: MoEAuxSpec = field(default_factory=MoEAuxSpec)
    dsa: DSAAuxSpec = field(default_factory=DSAAuxSpec)
    mtp: MTPAuxSpec = field(default_factory=MTPAuxSpec)


@dataclass(frozen=True)
class RunPolicy:
    seq_len: int = 1024
    micro_batch: int = 8
    global_batch: int = 8            # sequences per optimizer step (accumulation = global / (micro * data))
    steps: int = 1000
    seed: int = 0
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    precision: PrecisionSpec = field(default_factory=PrecisionSpec)
    # Activation checkpointing per family letter: none | full | selective
    activation_checkpointing: dict[str, str] = field(default_factory=lambda: {
        "A": "none", "M": "none", "R": "none", "E": "none", "F": "none"})
    compile: CompileSpec = field(default_factory=CompileSpec)
    kernels: KernelSpec = field(default_factory=KernelSpec)
    # Memory patches wanted: name -> "required" | "preferred" | "off".
    patches: dict[str, str] = field(default_factory=lambda: {
        "linear_ce": "preferred", "dsa_indexer_fused": "preferred"})
    aux: AuxSpec = field(default_factory=AuxSpec)
    parallel: ParallelSpec = field(default_factory=ParallelSpec)
    data: str = ""                   # data snapshot directory ("" : the default snapshot)
    eval_interval: int = 100
    eval_batches: int = 8
    checkpoint_interval: int = 500
    keep_checkpoints: int = 3
    log_interval: int = 10
    max_nonfinite_steps: int = 5     # consecutive NaN/Inf steps before the run stops
