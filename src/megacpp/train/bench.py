"""`megacpp bench`: training-step throughput of a recipe on this device.

Measures the real training step (the recipe's precision, patches,
activation checkpointing and compile; AdamW; LM + MoE auxiliary losses) on
synthetic packed rows: random tokens with random document boundaries, so
attention and the scans take the document-masked path that real data takes.
Reports the median step time, tokens/s, MFU by the model-FLOPs counter
(`megacpp describe`), peak memory, and the time of one isolated forward +
backward of each block family (times its layer count), measured with CUDA
events (or the host clock on CPU). On CUDA, `kernels=True` also profiles
two whole steps and each family's isolated forward + backward with
torch.profiler (train/kernel_profile.py): GPU busy time against wall time,
time by kernel kind, and the largest kernels.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..losses.moe_aux import moe_aux_terms
from ..recipe import Recipe
from ..recipe.count import summarize
from ..recipe.pattern import FAMILY
from .grads import GradAccumulator
from .activation import apply_activation_checkpointing, apply_kernel_policy, mamba_in_proj_split, moe_gate_layers
from .compile import GRAPH_MODES, apply_compile, compile_stats, graph_step_begin, keep_grads_outside_graphs
from .device import device_facts, peak_flops, pick_device
from .gpu_clocks import ClockSampler, clocks_text
from .kernel_profile import KernelProfile, gemm_text, profile_gemms, profile_kernels, profile_text
from .optim import Optimizers
from .precision import Precision


@dataclass
class BenchResult:
    recipe: str
    recipe_hash: str
    device: str
    batch: int
    seq_len: int
    steps: int
    step_ms_median: float
    step_ms_all: list[float]
    tokens_per_s: float
    mfu: float | None
    flops_per_token: float
    total_params: int
    active_params: int
    peak_memory_gib: float
    family_ms: dict[str, float] = field(default_factory=dict)
    family_note: str = ""   # how the families were timed where not as the step runs them, and any left out
    patches: list[dict] = field(default_factory=list)
    compile: dict = field(default_factory=dict)
    activation_checkpointing: dict = field(default_factory=dict)
    precision: str = ""
    # "synthetic", or the snapshot id whose train split fed one fresh batch per step
    data: str = "synthetic"
    # micro-batches of `batch` rows a step runs before its optimizer step
    grad_accumulation: int = 1
    ssd_backend: str = ""
    conv_backend: str = ""
    # the kernels the step took (as the trainer's manifest records them)
    attention_backend: str = ""
    delta_rule_backend: str = ""
    gated_norm_backend: str = ""
    swiglu_backend: str = ""
    fused_projections: bool = False  # model.projections.fusion_enabled(): off unless asked
    moe_wgrad_splits: int = 1        # policy.kernels.moe_wgrad_splits as the E layers took it
    mamba_in_proj_split: int = 0     # Mamba-2 layers whose in_proj ran as three GEMMs (policy.kernels.mamba_in_proj)
    moe_gate_layers: int = 0         # E layers with the gates in the experts' activation (policy.kernels.moe_gate)
    grad_sum: str = ""               # micro-batch gradients summed by "foreach" (train.grads) or "autograd"
    linear_ce_dw_path: str | None = None  # the Triton head's d_weight accumulation, once it ran
    clocks: dict = field(default_factory=dict)  # gpu_clocks.ClockSampler over the timed steps
    # torch.profiler on CUDA (kernels=True): the whole step, and per family
    # {"layers": n, "per_layer": KernelProfile} of one layer's isolated fwd + bwd
    step_profile: dict = field(default_factory=dict)
    # the step's matmuls by (op, shapes): ms, calls and TFLOP/s (kernel_profile.profile_gemms)
    gemm_profile: list = field(default_factory=list)
    family_profile: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def synthetic_batch(vocab: int, batch: int, seq: int, device, mean_doc: int = 1024, seed: int = 0) -> dict:
    """Random tokens in packed rows: documents of geometric-ish random lengths."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq + 1), generator=g)
    starts = torch.rand(batch, seq + 1, generator=g) < (1.0 / mean_doc)
    starts[:, 0] = True
    doc = starts.long().cumsum(1) - 1
    pos = torch.arange(seq + 1).expand(batch, -1).clone()
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(1).values
    positions = pos - first
    labels = ids[:, 1:].clone()
    labels[doc[:, 1:] != doc[:, :-1]] = -100
    out = {"input_ids": ids[:, :-1], "labels": labels, "doc_ids": doc[:, :-1].int(),
           "positions": positions[:, :-1]}
    return {k: v.to(device) for k, v in out.items()}


def _delta_text(rec: dict) -> str:
    """The delta rule's record as the bench line shows it: "triton (intermediates: keep)"."""
    text = rec["backend"] or ""
    if rec.get("intermediates"):
        text += f" (intermediates: {rec['intermediates']})"
    return text


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def family_probe(comp: dict) -> str:
    """How the per-family timing calls a layer, given the step's compile record:
    "as built" (eager, or already compiled one graph per layer in inductor's
    default mode) or "compiled alone": the step compiles the model as one graph
    (its layers are not compiled on their own) or replays CUDA graphs (a layer
    called alone would replay over the tensors its graph's backward still
    needs: torch 2.11 raised "accessing tensor output of CUDAGraphs that has
    been overwritten"), so each family's layer forward is compiled by itself in
    inductor's default mode, as per-layer compile would run it."""
    mode = comp.get("mode", "none")
    if mode == "none" or (comp.get("scope") == "block" and mode not in GRAPH_MODES):
        return "as built"
    return "compiled alone"


def _family_times(model, recipe: Recipe, batch: dict, precision: Precision, device, reps: int = 5,
                  kernels: bool = False, probe: str = "as built") -> tuple[dict, dict, list[str]]:
    """Isolated fwd+bwd of one layer of each letter, times its count (ms per step);
    with kernels, also that layer's kernel profile (per layer, unscaled). probe:
    family_probe()'s answer. A family whose timing fails is left out and named in
    the returned notes (the bench's other results stand)."""
    from ..model.context import SeqContext

    letters = recipe.layers.letters
    out: dict[str, float] = {}
    prof: dict[str, dict] = {}
    failed: list[str] = []
    b, t = batch["input_ids"].shape
    d = recipe.model.hidden_size
    ctx = SeqContext(b, t, device, batch["doc_ids"], batch["positions"])
    model._precompute_context(ctx)  # as the model's forward does (the same memo keys, no recompiles)
    for letter in dict.fromkeys(letters):
        idx = letters.index(letter)
        layer = model.layers[idx]
        # the module's own forward: not a per-layer compile's (or CUDA graph's) __call__
        call = layer if probe == "as built" else torch.compile(layer.forward)
        x = torch.randn(b, t, d, device=device, requires_grad=True)
        grad_out: list[torch.Tensor] = []

        def fwd_bwd():
            # No loss kernels and no gradient accumulation of its own: the
            # layer's backward from a fixed output gradient, into gradients
            # set afresh (in the H200 profiles of 2026-11-28 a square-mean
            # loss and five float32 adds a call were ~0.2 ms of every family)
            layer.zero_grad(set_to_none=True)
            x.grad = None
            with precision.autocast():
                y, _, _ = call(x, ctx)
            if not grad_out:
                grad_out.append(torch.randn_like(y))
            y.backward(grad_out[0])

        fam = FAMILY[letter] + ("" if letter not in "D" else "+dsa")
        times = []
        try:
            for i in range(reps + 2):
                _sync(device)
                t0 = time.perf_counter()
                fwd_bwd()
                _sync(device)
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # a probe that does not compile or run: the step's results stand
            failed.append(f"{fam} ({letter}) not timed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
            model.zero_grad(set_to_none=True)
            continue
        out[fam] = out.get(fam, 0.0) + statistics.median(times) * letters.count(letter)
        if kernels:
            # 20 kernels a family: past the largest few, where a layer's
            # memory-bound remainder goes is the question (issue 8)
            p = profile_kernels(fwd_bwd, 3, device, top=20)
            if p is not None:
                prof[f"{fam}:{letter}"] = {"layers": letters.count(letter), "per_layer": p.to_dict()}
        model.zero_grad(set_to_none=True)
    return out, prof, failed


def run_bench(recipe: Recipe, steps: int = 20, warmup: int = 5, device: str | None = None,
              family_times: bool = True, micro_batch: int | None = None,
              data: str | None = None, kernels: bool = True, accum: int = 1,
              top_kernels: int = 25) -> BenchResult:
    """data: a snapshot directory; each step then takes a fresh batch from its
    train split through the trainer's loader (prefetch thread, pinned memory),
    inside the timed step, instead of one synthetic batch reused.

    accum: micro-batches a step runs forward and backward before its one
    clip + optimizer step, as the trainer accumulates; 0 = the recipe's own
    on one device (policy.global_batch / micro batch). Tokens per step count
    every micro-batch."""
    import megacpp
    from ..patches.registry import install_patches
    from ..model.projections import fusion_enabled
    from .trainer import (_attention_backend, _delta_rule_backend, _kernel_choice, gated_norm_record,
                          linear_ce_dw_path, lm_loss, moe_wgrad_splits, split_aux, swiglu_record)

    dev = pick_device(device)
    pol, spec = recipe.policy, recipe.model
    torch.manual_seed(pol.seed)
    model = megacpp.build_model(spec).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    precision = Precision(pol.precision, dev)
    records = install_patches(model, pol.patches, dev, precision.dtype)
    precision.apply(model)  # parameter dtypes + low-precision GEMMs, as the trainer does
    ac = apply_activation_checkpointing(model, recipe.layers.letters, pol.activation_checkpointing)
    apply_kernel_policy(model, pol.kernels)  # before compile: read at trace time
    comp = apply_compile(model, pol.compile, dev, pol.parallel.sharding)
    grads_in_place = keep_grads_outside_graphs(model, comp)
    # as the trainer sums micro-batches on one device; a bad MEGACPP_GRAD_SUM is one clear error
    grad_acc = _kernel_choice("gradient sum", lambda: GradAccumulator(model, grads_in_place))
    opt = Optimizers(model, pol.optimizer, dev)
    B = micro_batch or pol.micro_batch
    if accum < 0:
        raise ValueError(f"bench: accum must be >= 0 (0 = the recipe's), got {accum}")
    if top_kernels < 1:
        raise ValueError(f"bench: top_kernels must be >= 1, got {top_kernels}")
    accum = accum or max(1, pol.global_batch // B)
    batch = synthetic_batch(spec.vocab_size, B, pol.seq_len, dev, seed=pol.seed)
    batches = None
    data_id = "synthetic"
    if data is not None:
        from ..data.loader import PackedLoader, open_snapshot
        snap = open_snapshot(data)
        if snap.seq_len != pol.seq_len:
            from ..errors import MegacppError
            raise MegacppError(f"{data}: snapshot rows hold seq_len {snap.seq_len}, the recipe wants "
                               f"policy.seq_len={pol.seq_len}")
        data_id = snap.snapshot_id
        batches = iter(PackedLoader(snap, "train", B, seed=pol.seed, pin_memory=dev.type == "cuda"))
    moe_w, z_w = pol.aux.moe.weight if pol.aux.moe.enabled else 0.0, pol.aux.moe.z_loss_weight
    state = {"batch": batch}

    def micro_step():
        if batches is not None:
            state["batch"] = {k: v.to(dev, non_blocking=True) for k, v in next(batches).items()}
        batch = state["batch"]
        graph_step_begin(comp)
        with precision.autocast():
            out = model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"],
                        return_hidden_only=True)
            loss = lm_loss(model, out.hidden, batch["labels"])
            routers, _ = split_aux(out.aux)
            if routers and moe_w:
                lb, zl = moe_aux_terms(routers)
                loss = loss + moe_w * lb + z_w * zl
        grad_acc.backward(precision.scale(loss / accum))

    def one_step():
        for _ in range(accum):
            micro_step()
        precision.unscale_(opt.optimizers)
        if pol.optimizer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), pol.optimizer.grad_clip, foreach=True)
        precision.step(opt.optimizers)
        grad_acc.zero_grad(opt, set_to_none=not grads_in_place)

    for _ in range(warmup):
        one_step()
    times = []
    # the card's clocks and power while the timed steps run (MFU assumes its boost clock)
    with ClockSampler(dev) as clocks:
        for _ in range(steps):
            _sync(dev)
            t0 = time.perf_counter()
            one_step()
            _sync(dev)
            times.append((time.perf_counter() - t0) * 1e3)
    peak_mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    step_prof = profile_kernels(one_step, 2, dev, top=top_kernels) if kernels else None
    # under CUDA graphs the host sees one graph launch, no matmul ops
    graphs = comp.get("mode") in GRAPH_MODES
    gemms = profile_gemms(one_step, 1, dev) if kernels and not graphs else None
    batch = state["batch"]
    s = summarize(recipe)
    med = statistics.median(times)
    tps = accum * B * pol.seq_len / (med / 1e3)
    peak = peak_flops(dev)
    fam, fam_prof, fam_note = {}, {}, ""
    if family_times:
        probe = family_probe(comp)
        fam, fam_prof, failed = _family_times(model, recipe, batch, precision, dev, kernels=kernels, probe=probe)
        notes = []
        if probe == "compiled alone":
            why = (f"the step replays CUDA graphs ({comp['mode']})" if graphs
                   else "the step compiles the model as one graph")
            notes.append(f"each family's layer compiled alone in inductor's default mode ({why})")
        fam_note = "; ".join(notes + failed)
    return BenchResult(
        recipe=spec.name, recipe_hash=recipe.hash, device=device_facts(dev).get("name", str(dev)),
        batch=B, grad_accumulation=accum, seq_len=pol.seq_len, steps=steps, step_ms_median=med, step_ms_all=times,
        tokens_per_s=tps, mfu=(tps * s.flops_per_token / peak) if peak else None,
        flops_per_token=s.flops_per_token, total_params=s.total_params, active_params=s.active_params,
        peak_memory_gib=peak_mem, family_ms=fam, family_note=fam_note, patches=[r.to_dict() for r in records],
        compile={**comp, **compile_stats()}, activation_checkpointing={"policy": dict(pol.activation_checkpointing),
                                                                       "applied_layers": len(ac)},
        precision=pol.precision.compute
        + ("" if precision.residual_dtype is None else f" (residual stream {pol.precision.compute})")
        + ("" if pol.precision.low_precision == "none"
                                           else f"+{pol.precision.low_precision}")
        + ("" if pol.precision.expert_low_precision == "none"
           else f"+experts {pol.precision.expert_low_precision} (quantizer: {_expert_quantizer(model)})"),
        data=data_id, ssd_backend=_ssd_backend(dev, precision.dtype, pol.kernels.ssd_states),
        conv_backend=_conv_backend(dev, precision.dtype, model),
        attention_backend=_attention_backend(model, dev),
        delta_rule_backend=_delta_text(_delta_rule_backend(model, dev, precision.dtype)),
        gated_norm_backend=_gated_norm_text(gated_norm_record(model, dev, precision.dtype)),
        swiglu_backend=swiglu_record(model, dev, precision.dtype)["backend"] or "",
        fused_projections=fusion_enabled(), moe_wgrad_splits=moe_wgrad_splits(model) or 1,
        mamba_in_proj_split=mamba_in_proj_split(model), moe_gate_layers=moe_gate_layers(model),
        grad_sum="foreach" if grad_acc.enabled else "autograd",
        linear_ce_dw_path=linear_ce_dw_path(model),
        clocks=clocks.result,
        step_profile=step_prof.to_dict() if step_prof is not None else {}, family_profile=fam_prof,
        gemm_profile=gemms or [])


def _gated_norm_text(rec: dict) -> str:
    """'triton', 'reference', or per group width when they differ: 'triton (128), reference (1536)'."""
    if rec["backend"] != "mixed":
        return rec["backend"] or ""
    return ", ".join(f"{b} ({g})" for g, b in rec["by_group"].items())


def _conv_backend(dev, dtype, model) -> str:
    """"triton (K4 walk/walk)": the backend and, on Triton, each conv width's fwd/bwd kernels."""
    from ..ops.causal_conv import conv_backend
    b = conv_backend(dev, dtype)
    if b == "triton":
        from .trainer import conv_paths
        b += " (" + ", ".join(f"K{k} {p['fwd']}/{p['bwd']}" for k, p in conv_paths(model).items()) + ")"
    return b


def _expert_quantizer(model) -> str:
    """The FP8 quantizer the model's experts were converted with ("torch", ...), as they run it."""
    from ..model.moe import Experts
    modes = {m.low_precision.partition(":")[2] for m in model.modules() if isinstance(m, Experts)}
    return ",".join(sorted(modes))


def _ssd_backend(dev, dtype, states: str) -> str:
    """"triton (chunk states: keep)" or "reference"."""
    from ..ops.ssd import ssd_backend
    b = ssd_backend(dev, dtype)
    return b + (f" (chunk states: {states})" if b == "triton" else "")


def bench_text(r: BenchResult) -> str:
    acc = f" x {r.grad_accumulation} micro-batches a step" if r.grad_accumulation > 1 else ""
    lines = [f"{r.recipe} ({r.recipe_hash[:12]}) on {r.device}: batch {r.batch} x seq {r.seq_len}{acc}, "
             f"{r.precision}, compile {r.compile.get('mode')}",
             f"  step {r.step_ms_median:.1f} ms (median of {r.steps}), {r.tokens_per_s:,.0f} tokens/s, "
             f"MFU {r.mfu * 100:.1f}%" if r.mfu is not None else
             f"  step {r.step_ms_median:.1f} ms (median of {r.steps}), {r.tokens_per_s:,.0f} tokens/s, MFU n/a",
             f"  peak memory {r.peak_memory_gib:.2f} GiB; {r.flops_per_token / 1e9:.3f} GFLOP/token; "
             f"params {r.total_params / 1e6:.1f}M total, {r.active_params / 1e6:.1f}M active",
             "  patches: " + ", ".join(f"{p['name']}={p['backend'] or 'off'}" for p in r.patches)
             + (f" (d_weight: {r.linear_ce_dw_path})" if r.linear_ce_dw_path else "")
             + f"; SSD scan: {r.ssd_backend or '?'}; causal conv: {r.conv_backend or '?'}"
             + f"; delta rule: {r.delta_rule_backend or '-'}; gated norm: {r.gated_norm_backend or '-'}"
             + f"; SwiGLU: {r.swiglu_backend or '-'}"
             + f"; fused projections: {'on' if r.fused_projections else 'off'}"
             + (f"; MoE wgrad splits: {r.moe_wgrad_splits}" if r.moe_wgrad_splits != 1 else "")
             + (f"; Mamba in_proj: split ({r.mamba_in_proj_split} layers)" if r.mamba_in_proj_split else "")
             + (f"; MoE gates in the activation ({r.moe_gate_layers} layers)" if r.moe_gate_layers else "")
             + (f"; grad sum: {r.grad_sum}" if r.grad_sum else "")
             + f"; packed attention: {r.attention_backend or '?'}; data: {r.data}"]
    if r.clocks:
        lines.append("  " + clocks_text(r.clocks, r.mfu))
    if r.family_note:
        lines.append(f"  per family: {r.family_note}")
    if r.family_ms:
        tot = sum(r.family_ms.values())
        lines.append("  isolated fwd+bwd per family (ms/step, share): " + ", ".join(
            f"{k} {v:.1f} ({v / tot * 100:.0f}%)" for k, v in sorted(r.family_ms.items(), key=lambda kv: -kv[1])))
    if r.step_profile:
        lines += profile_text("profiled step", KernelProfile(**r.step_profile))
    if r.gemm_profile:
        peak = r.tokens_per_s * r.flops_per_token / r.mfu / 1e12 if r.mfu else None
        lines += gemm_text(r.gemm_profile, peak)
    for key, fp in r.family_profile.items():
        lines += profile_text(f"{key} x{fp['layers']} (isolated fwd+bwd, all its layers)",
                              KernelProfile(**fp["per_layer"]), scale=fp["layers"])
    return "\n".join(lines)
