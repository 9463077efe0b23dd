"""`megacpp train`: one recipe + one data snapshot -> a trained model and a run record.

The loop, top to bottom (search any behaviour by its name here):
  preflight -> build model -> install patches -> activation checkpointing ->
  compile -> optimizers -> (resume) -> for each step: lr, micro-batches with
  gradient accumulation (LM loss through the linear-CE patch, auxiliary
  losses behind their step gates), unscale, clip, non-finite guard,
  optimizer step, MoE bias update, metrics, eval, checkpoint -> final record.
Distributed runs reuse this loop: `dist` (rank, world size, wrappers) is
applied from outside the model by train/distributed.py.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MegacppError
from ..losses.gates import GateSet
from ..losses.moe_aux import moe_aux_terms
from ..losses.stp import stp_over_layers
from ..model.projections import fusion_enabled
from ..recipe import Recipe
from ..recipe.count import summarize
from ..recipe.validate import stp_layers
from ..run.manifest import MANIFEST, git_commit, new_manifest, write_json_atomic
from .grads import GradAccumulator
from .activation import apply_activation_checkpointing, apply_kernel_policy, mamba_in_proj_split, moe_gate_layers
from .checkpoint import DCP, latest_good, load_sharded, load_weights, read_state, save_checkpoint, save_sharded
from .compile import apply_compile, compile_stats, graph_step_begin, keep_grads_outside_graphs
from .device import device_facts, memory_available, peak_flops, peak_memory, pick_device
from .gpu_clocks import ClockSampler

CLOCK_WARM_STEPS = 2   # a run's first steps compile (and capture CUDA graphs): no clock samples
from .metrics import MetricsWriter
from .optim import Optimizers
from .precision import Precision
from .schedule import lr_at

IGNORE = -100
LN2 = math.log(2.0)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    end_reason: str
    final_train_loss: float | None
    final_val_loss: float | None
    final_val_bpb: float | None
    first_val_bpb: float | None
    manifest: dict = field(repr=False, default_factory=dict)


class _Signals:
    """First SIGTERM/SIGINT: finish the step, save, exit 0. Second: abort now."""

    def __init__(self):
        self.requested: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# ----------------------------------------------------------------- preflight
# Measured peak / `describe`'s per-device estimate on an H200 (BENCHMARKS.md,
# "Activation checkpointing per family", 2026-11-27): 1.22-1.44x for
# nam-125m, nam-1b and nam56r. A run whose estimate fits with less than this
# margin is started, with a warning.
ESTIMATE_MARGIN = 1.45


def memory_margin_warning(need: float, have: float, device) -> str | None:
    """The warning for an estimate that fits `have` bytes but not with ESTIMATE_MARGIN, else None."""
    if need * ESTIMATE_MARGIN <= have:
        return None
    return (f"memory estimate {need / 2**30:.1f} GiB per device fits the {have / 2**30:.1f} GiB free on "
            f"{device}, but measured peaks have run up to {ESTIMATE_MARGIN}x the estimate: this run may "
            f"run out of memory (policy.micro_batch or policy.activation_checkpointing can lower it)")


def preflight(recipe: Recipe, out_dir: Path, data_dir: Path, device: torch.device, resume: bool,
              warnings: list[str] | None = None):
    """Every cheap check before any heavy work; MegacppError (exit 2) on failure.

    Nothing is written into out_dir here, so a failed start leaves no trace.
    `warnings` (if given) receives what does not stop the run (a memory
    estimate that fits without ESTIMATE_MARGIN).
    """
    from ..data.loader import open_snapshot

    if out_dir.exists() and not out_dir.is_dir():
        raise MegacppError(f"{out_dir}: --out exists and is not a directory")
    if out_dir.exists() and (out_dir / MANIFEST).exists() and not resume:
        raise MegacppError(f"{out_dir}: already holds a run (run.json); pass --resume to continue it "
                           f"or choose another --out")
    if resume and not (out_dir / MANIFEST).exists():
        raise MegacppError(f"{out_dir}: --resume given but there is no run here (no run.json)")
    parent = out_dir if out_dir.exists() else out_dir.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise MegacppError(f"{out_dir}: not writable ({parent} denies writes)")
    s = summarize(recipe)
    ckpt_bytes = s.total_params * (4 + 8) + (64 << 20)
    free = shutil.disk_usage(parent).free
    if free < 2 * ckpt_bytes:
        raise MegacppError(f"{out_dir}: {free / 2**30:.1f} GiB free, a checkpoint needs about "
                           f"{ckpt_bytes / 2**30:.1f} GiB (two must fit during a save)")
    # this device's share: FSDP2 shards the states, checkpointed layers keep only their input
    need = s.memory["device_estimate"]
    have = memory_available(device)
    if need > have:
        raise MegacppError(
            f"recipe {recipe.model.name}: memory estimate {need / 2**30:.1f} GiB per device exceeds the "
            f"{have / 2**30:.1f} GiB free on {device} (policy.micro_batch, policy.seq_len or "
            f"policy.activation_checkpointing can lower it)")
    margin = memory_margin_warning(need, have, device)
    if margin and warnings is not None:
        warnings.append(margin)
    snap = open_snapshot(data_dir)  # schema, files, sizes, checksums
    if snap.vocab_size > recipe.model.vocab_size:
        raise MegacppError(
            f"{snap.tokenizer_path}: tokenizer has {snap.vocab_size} tokens but model.vocab_size is "
            f"{recipe.model.vocab_size}; prepare the snapshot with this recipe (--recipe) or raise "
            f"model.vocab_size")
    if snap.seq_len != recipe.policy.seq_len:
        raise MegacppError(
            f"{data_dir}/snapshot.json: rows are packed for seq_len {snap.seq_len} but "
            f"policy.seq_len is {recipe.policy.seq_len}; re-prepare with --seq-len "
            f"{recipe.policy.seq_len} or --set policy.seq_len={snap.seq_len}")
    return snap


def default_snapshot_dir() -> Path:
    return Path(os.environ.get("MEGACPP_DATA", "data/system"))


# ----------------------------------------------------------------- the losses
def lm_loss(model, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Head + cross-entropy through the installed linear-CE patch (else the plain path)."""
    fn = getattr(model, "lm_loss_fn", None)
    if fn is None:
        from ..patches.linear_ce import plain_linear_ce as fn
    return fn(hidden.reshape(-1, hidden.shape[-1]), model.head_weight, labels.reshape(-1),
              reduction=reduction)


def mtp_targets(labels: torch.Tensor, doc_ids: torch.Tensor, k: int) -> torch.Tensor:
    """Depth k (0-based) predicts the token k+1 places after the next one."""
    shift = k + 1
    tgt = torch.full_like(labels, IGNORE)
    if labels.shape[1] <= shift:
        return tgt
    tgt[:, :-shift] = labels[:, shift:]
    same_doc = doc_ids[:, :-shift] == doc_ids[:, shift:]
    tgt[:, :-shift] = torch.where(same_doc, tgt[:, :-shift], torch.full_like(tgt[:, :-shift], IGNORE))
    return tgt


def split_aux(aux: dict) -> tuple[list, list]:
    """(router stats of every E layer, DSA stats of every D layer), in module order."""
    return list(aux.get("moe", [])), list(aux.get("dsa", []))


class Trainer:
    def __init__(self, recipe: Recipe, out_dir: str | Path, data_dir: str | Path | None = None,
                 resume: bool = False, device: str | None = None, quiet: bool = False,
                 dist=None, max_steps: int | None = None, time_limit: float | None = None,
                 profile: tuple[int, int] | None = None, profile_host: bool = True):
        self.recipe = recipe
        self.pol = recipe.policy
        self.out = Path(out_dir)
        self.data_dir = Path(data_dir or recipe.policy.data or default_snapshot_dir())
        self.resume = resume
        self.quiet = quiet
        self.max_steps = max_steps  # stop early without a final save (tests: an interrupted run)
        self.time_limit = time_limit  # seconds of this process; then save and stop like a signal
        self.profile = profile  # (start, end) steps under torch.profiler
        # False: CUDA kernels only (recording host operators slows the host); CPU runs record the host anyway
        self.profile_host = profile_host
        self._prof = None
        self.clocks: ClockSampler | None = None  # started by run()
        if dist is None:
            from .distributed import single_process
            dist = single_process()
        self.dist = dist
        self.device = pick_device(device) if dist.device is None else dist.device
        self._preflight_warnings: list[str] = []
        self.snapshot = preflight(recipe, self.out, self.data_dir, self.device, resume,
                                  self._preflight_warnings)
        if self.dist.is_main:
            for w in self._preflight_warnings:
                print(f"warning: {w}", file=sys.stderr)

    # -------------------------------------------------------------- set up
    def _build(self) -> None:
        import megacpp
        from ..data.loader import PackedLoader
        from ..patches.registry import install_patches

        pol, spec = self.pol, self.recipe.model
        # every rank has passed preflight before rank 0 writes anything into --out
        self.dist.barrier()
        seed_everything(pol.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cuda":
            # initialise on the GPU: for a multi-billion-parameter recipe the CPU
            # init (one thread per rank under torchrun) dominates start-up
            with torch.device(self.device):
                self.model = megacpp.build_model(spec)
        else:
            self.model = megacpp.build_model(spec).to(self.device)
        self.precision = Precision(pol.precision, self.device)
        self.patch_records = install_patches(self.model, pol.patches, self.device, self.precision.dtype)
        self.precision.apply(self.model)  # parameter dtypes + low-precision GEMMs; listed in the manifest
        self.letters = self.recipe.layers.letters
        self.ac_applied = apply_activation_checkpointing(self.model, self.letters,
                                                         pol.activation_checkpointing)
        apply_kernel_policy(self.model, pol.kernels)  # before compile: read at trace time
        self.train_model = self.dist.wrap(self.model, self.recipe)
        self.compile_info = apply_compile(self.model, pol.compile, self.device, pol.parallel.sharding)
        self.grads_in_place = keep_grads_outside_graphs(self.model, self.compile_info)
        # opt-in (MEGACPP_GRAD_SUM=foreach): one foreach copy/add a micro-batch into the kept
        # .grads (train.grads), one device only; autograd's own sum by default
        self.grad_acc = _kernel_choice("gradient sum", lambda: GradAccumulator(
            self.model, self.grads_in_place and not self.dist.active))
        self.opt = Optimizers(self.model, pol.optimizer, self.device)
        has = set(self.letters)
        self.gates = GateSet.from_policy(pol.aux, {"moe": "E" in has, "dsa": "D" in has,
                                                   "mtp": spec.mtp.depths > 0, "stp": True})
        self.stp_layers = stp_layers(pol.aux.stp.layers, spec.depth)
        per_rank = pol.global_batch // self.dist.world_size
        self.accum = per_rank // pol.micro_batch
        self.loader = PackedLoader(self.snapshot, "train", pol.micro_batch, seed=pol.seed,
                                   rank=self.dist.rank, world_size=self.dist.world_size,
                                   drop_last=True, pin_memory=self.device.type == "cuda")
        self.summary = summarize(self.recipe)
        self.peak = peak_flops(self.device)
        self.step = 0
        self.warnings: list[str] = list(self._preflight_warnings)
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.last_val: tuple[float, float] | None = None
        self.last_val_step: int | None = None
        self.first_val_bpb: float | None = None
        self.first_val_step: int | None = None
        self.train_loss_ema: float | None = None
        self.tokens_seen = 0
        self.wall_before = 0.0

    def _state(self) -> dict:
        return {"step": self.step, "optimizer": self.opt.state_dict(),
                "precision": self.precision.state_dict(), "loader": self.loader.state_dict(),
                "gates": self.gates.state_dict(), "rng": rng_state(),
                "counters": {"nonfinite_total": self.nonfinite_total, "tokens_seen": self.tokens_seen,
                             "first_val_bpb": self.first_val_bpb, "first_val_step": self.first_val_step,
                             "wall": self._wall(),
                             "train_loss_ema": self.train_loss_ema},
                "recipe_hash": self.recipe.hash}

    def _restore(self) -> None:
        from .distributed import layout_free_hash, reshard_loader_state

        v, warnings = latest_good(self.out / "checkpoints", self.dist)
        self.warnings += warnings
        if v is None:
            if warnings:
                self.warnings.append("no valid checkpoint: starting from step 0")
            return
        st = read_state(v)
        if st.get("recipe_hash") != self.recipe.hash:
            # another world size / micro-batch split of the same global batch may resume
            if st.get("recipe_layout_hash") != layout_free_hash(self.recipe):
                raise MegacppError(f"{v.path}: checkpoint was written by recipe {st.get('recipe_hash', '?')[:12]}, "
                                   f"this run's recipe is {self.recipe.short_hash}; resume with the same recipe")
            old = st.get("layout", {})
            self.warnings.append(f"resumed under another layout: world size {old.get('world_size')} "
                                 f"({old.get('sharding')}, micro_batch {old.get('micro_batch')}) -> "
                                 f"{self.dist.world_size} ({self.dist.sharding}, micro_batch {self.pol.micro_batch})")
        if v.kind == DCP:
            load_sharded(v, self.model, self.opt.optimizers)
        elif self.dist.active:
            raise MegacppError(f"{v.path}: written by one process (model.safetensors); resume this run "
                               f"with one process, or start the multi-process run afresh")
        else:
            load_weights(v, self.model)
            self.opt.load_state_dict(st["optimizer"])
        self.dist.checkpoint_format = v.kind  # one format per run
        self.precision.load_state_dict(st["precision"])
        self.loader.load_state_dict(reshard_loader_state(st["loader"], self.loader))
        self.gates.load_state_dict(st["gates"])
        set_rng_state(st["rng"])
        c = st["counters"]
        self.step = st["step"]
        self.nonfinite_total = c["nonfinite_total"]
        self.tokens_seen = c["tokens_seen"]
        self.first_val_bpb = c["first_val_bpb"]
        # checkpoints before the step was kept: the first eval ran at step 0
        self.first_val_step = c.get("first_val_step", 0 if self.first_val_bpb is not None else None)
        self.wall_before = c["wall"]
        self.train_loss_ema = c.get("train_loss_ema")
        self.warnings.append(f"resumed from {v.path.name} (step {self.step})")

    def _wall(self) -> float:
        return self.wall_before + (time.time() - self.t_start)

    # -------------------------------------------------------------- manifest
    def _manifest(self, status: str, end_reason: str | None = None) -> dict:
        pol = self.pol
        m = new_manifest(self.recipe)
        m["patches"] = [r.to_dict() for r in self.patch_records]
        aux = self.gates.describe()
        aux["stp"].update({"form": pol.aux.stp.form, "n_spans": pol.aux.stp.n_spans,
                           "layers": self.stp_layers})
        aux["moe"].update({"bias_balancing": self.recipe.model.moe.bias_balancing,
                           "bias_update_rate": pol.aux.moe.bias_update_rate})
        aux["dsa"].update({"dense_warmup_steps": pol.aux.dsa.dense_warmup_steps})
        m["aux_losses"] = aux
        m["backend"] = {
            **device_facts(self.device),
            "precision": self.precision.describe(),
            "attention_backend": _attention_backend(self.model, self.device),
            "ssd_backend": _ssd_backend(self.device, self.precision.dtype, pol.kernels.ssd_states),
            "conv_backend": _conv_backend(self.device, self.precision.dtype, self.model),
            "delta_rule_backend": _delta_rule_backend(self.model, self.device, self.precision.dtype),
            "gated_norm_backend": gated_norm_record(self.model, self.device, self.precision.dtype),
            "swiglu_backend": swiglu_record(self.model, self.device, self.precision.dtype),
            # attention's q/k/v and Gated DeltaNet's input projections as one GEMM each
            "fused_projections": _kernel_choice("fused projections", fusion_enabled),
            # each expert's rows cut into this many parts for the experts' weight gradient
            # (policy.kernels.moe_wgrad_splits; None without E layers)
            "moe_wgrad_splits": moe_wgrad_splits(self.model),
            # Mamba-2 layers whose in_proj ran as three GEMMs (policy.kernels.mamba_in_proj = "split")
            "mamba_in_proj_split_layers": mamba_in_proj_split(self.model),
            # E layers whose experts' activation took the gates (policy.kernels.moe_gate)
            "moe_gate_activation_layers": moe_gate_layers(self.model),
            "linear_ce_dw_path": linear_ce_dw_path(self.model),
            # how micro-batches' gradients are summed into .grad: one foreach pass
            # a micro-batch (train.grads, CUDA graphs on one device) or autograd's
            "grad_sum": "foreach" if self.grad_acc.enabled else "autograd",
            "compile": {**self.compile_info, **compile_stats()},
            "activation_checkpointing": {"policy": dict(pol.activation_checkpointing),
                                         "applied_layers": len(self.ac_applied)},
            "world_size": self.dist.world_size, "layout": self.dist.describe(),
            "seed": pol.seed, "deterministic": self.device.type == "cpu",
            "micro_batch": pol.micro_batch, "grad_accumulation": self.accum,
            "global_batch": pol.global_batch, "seq_len": pol.seq_len,
            "optimizer": self.opt.report,
            "data": {"path": str(self.data_dir), "snapshot_id": self.snapshot.snapshot_id,
                     "tokenizer_sha256": self.snapshot.tokenizer_sha256,
                     "schema_version": self.snapshot.schema_version},
            "megacpp": m["megacpp_version"], "git": git_commit(),
        }
        tl, vl = self.train_loss_ema, self.last_val
        m["outcome"] = {
            "status": status, "end_reason": end_reason, "steps": self.step,
            "tokens": self.tokens_seen, "final_train_loss": tl,
            "final_val_loss": vl[0] if vl else None, "final_val_bpb": vl[1] if vl else None,
            "first_val_bpb": self.first_val_bpb, "wall_seconds": round(self._wall(), 2),
            # the steps those two evals ran at (equal: no eval after the first one)
            "final_val_step": self.last_val_step if vl else None, "first_val_step": self.first_val_step,
            "peak_memory_bytes": peak_memory(self.device),
            "nonfinite_steps_skipped": self.nonfinite_total, "warnings": list(self.warnings),
            # the main rank's card while the run ran (SM clock, power, throttle
            # reasons): MFU counts the boost clock's peak, a capped card runs below it
            "clocks": self.clocks.current() if self.clocks is not None else {"available": False, "why": "not run"},
        }
        return m

    def _write_manifest(self, status: str, end_reason: str | None = None) -> dict:
        m = self._manifest(status, end_reason)
        if self.dist.is_main:
            write_json_atomic(self.out / MANIFEST, m)
        return m

    def _save(self) -> None:
        from .distributed import layout_free_hash

        st = self._state()
        st["recipe_layout_hash"] = layout_free_hash(self.recipe)
        st["layout"] = {"world_size": self.dist.world_size, "sharding": self.dist.sharding,
                        "micro_batch": self.pol.micro_batch}
        root = self.out / "checkpoints"
        if self.dist.checkpoint_format == DCP:  # collective: every rank writes its shard
            del st["optimizer"]  # saved by name, sharded, in the DCP files
            save_sharded(root, self.step, self.model, self.opt.optimizers, st,
                         self.pol.keep_checkpoints, self.dist)
        elif self.dist.is_main:
            save_checkpoint(root, self.step, self.model, st, self.pol.keep_checkpoints)
        self._write_manifest("running")

    # -------------------------------------------------------------- eval
    @torch.no_grad()
    def evaluate(self, split: str = "val", batches: int | None = None) -> tuple[float, float]:
        """Mean loss (nats/token) and bits per byte over the first batches of a split."""
        from ..data.loader import PackedLoader
        from .distributed import eval_batches_per_rank

        batches = self.pol.eval_batches if batches is None else batches
        # the same rows at any world size (`batches` counts micro-batches of the
        # whole job); drop_last: every rank runs as many forwards (FSDP2 gathers)
        batches = eval_batches_per_rank(batches, self.dist.world_size)
        loader = PackedLoader(self.snapshot, split, self.pol.micro_batch, seed=0, epochs=1,
                              rank=self.dist.rank, world_size=self.dist.world_size, prefetch=1,
                              drop_last=self.dist.active)
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        try:
            for i, batch in enumerate(loader):
                if batches and i >= batches:
                    break
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
                graph_step_begin(self.compile_info)
                with self.precision.autocast():
                    out = self.model(batch["input_ids"], doc_ids=batch["doc_ids"],
                                     positions=batch["positions"], return_hidden_only=True)
                    loss = lm_loss(self.model, out.hidden, batch["labels"]).float()
                n = (batch["labels"] != IGNORE).sum()
                total += torch.stack([loss.double() * n, n.double()])
        finally:
            loader.close()
            self.model.train()
        total = self.dist.all_reduce_sum(total)
        mean = float(total[0] / total[1].clamp_min(1))
        return mean, bits_per_byte(mean, self.snapshot, split)

    # -------------------------------------------------------------- one step
    def _micro_step(self, batch: dict, step: int, lm_scale: float | None = None) -> dict:
        """Forward + backward of one micro-batch; returns detached loss terms.

        The LM loss is a sum over this micro-batch's tokens times `lm_scale`
        (= world size / valid tokens in the whole global batch), so the
        gradient is the global per-token mean however the batch is split over
        micro-batches and ranks. Auxiliary terms are per-micro-batch means
        weighted 1/accum. Logged terms are per-token / per-micro means.
        """
        n_valid = (batch["labels"] != IGNORE).sum().clamp_min(1)
        if lm_scale is None:  # one micro-batch on its own
            lm_scale = 1.0 / float(n_valid) * self.accum
        pol, g = self.pol, self.gates
        stp_on = g["stp"].active(step)
        collect = None
        if stp_on:
            collect = "final" if self.stp_layers == "final" else list(self.stp_layers)
        terms: dict[str, torch.Tensor] = {}
        dense_stage = self._dsa_dense_stage(step)
        graph_step_begin(self.compile_info)
        with self.precision.autocast():
            out = self.train_model(batch["input_ids"], doc_ids=batch["doc_ids"],
                                   positions=batch["positions"], collect_hidden=collect,
                                   return_hidden_only=True)
            lm_sum = lm_loss(self.model, out.hidden, batch["labels"], reduction="sum")
            terms["lm_sum"] = lm_sum.detach().float()
            terms["lm_count"] = n_valid.float()
            terms["lm"] = (lm_sum.detach() / n_valid).float()
            total = lm_sum * (lm_scale / self.accum)
            aux_total = torch.zeros((), device=lm_sum.device)
            if stp_on:
                seed = pol.seed * 1_000_003 + step
                stp = stp_over_layers(out.collected, batch["doc_ids"], pol.aux.stp.n_spans,
                                      pol.aux.stp.form, seed)
                terms["stp"] = stp.detach()
                aux_total = aux_total + g["stp"].weight_at(step) * stp
            routers, dsa = split_aux(out.aux)
            if routers and (g["moe"].active(step) or g["moe_z"].active(step)):
                lb, zl = moe_aux_terms(routers)
                terms["moe_balance"], terms["moe_z"] = lb.detach(), zl.detach()
                aux_total = aux_total + g["moe"].weight_at(step) * lb + g["moe_z"].weight_at(step) * zl
            if dsa and g["dsa"].active(step):
                from ..losses.dsa_indexer import indexer_kl_loss
                kl = torch.stack([indexer_kl_loss(d) for d in dsa]).mean()
                terms["dsa_indexer"] = kl.detach()
                if dense_stage:
                    # DSA dense warm-up: only the indexer learns (its input is detached)
                    total = total * 0.0
                    aux_total = aux_total * 0.0
                aux_total = aux_total + g["dsa"].weight_at(step) * kl
            if out.mtp_hidden and g["mtp"].active(step):
                mtp = []
                for k, h in enumerate(out.mtp_hidden):
                    tgt = mtp_targets(batch["labels"], batch["doc_ids"], k)
                    mtp.append(lm_loss(self.model, h, tgt))
                mt = torch.stack(mtp).mean()
                terms["mtp"] = mt.detach()
                aux_total = aux_total + g["mtp"].weight_at(step) * mt
            total = total + aux_total / self.accum
        self.grad_acc.backward(self.precision.scale(total))
        terms["aux_total"] = aux_total.detach().float()
        if routers:
            with torch.no_grad():
                terms["_load"] = torch.stack([r.load.float() for r in routers])  # (layers, rows)
        return terms

    def _grad_norm(self) -> torch.Tensor:
        from .distributed import grad_norm_

        params = [p for p in self.model.parameters() if p.grad is not None]
        return grad_norm_(params, self.pol.optimizer.grad_clip)  # global norm, also of FSDP2 shards

    def train_step(self, step: int) -> dict:
        pol = self.pol
        lr = lr_at(step, pol.steps, pol.optimizer.lr, pol.schedule.kind, pol.schedule.warmup_steps,
                   pol.optimizer.min_lr_ratio, pol.schedule.decay_fraction)
        self.opt.set_lr(lr)
        self.gates.mark(step)
        sums: dict[str, torch.Tensor] = {}
        tokens = 0
        t_data = time.perf_counter()
        batches = [next(self.loader_iter) for _ in range(self.accum)]
        data_seconds = time.perf_counter() - t_data
        valid = torch.tensor([float(sum(int((b["labels"] != IGNORE).sum()) for b in batches))],
                             device=self.device)
        valid = float(self.dist.all_reduce_sum(valid))
        lm_scale = self.dist.world_size / max(valid, 1.0) * self.accum
        for micro, batch in enumerate(batches):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            with self.dist.no_sync(self.train_model, last=micro == self.accum - 1):
                terms = self._micro_step(batch, step, lm_scale)
            for k, v in terms.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            tokens += batch["input_ids"].numel()
        self.dist.sync_replicated_grads()  # FSDP2 gather="compute": the unsharded parameters
        if "_load" in sums:  # the global expert load: for the bias update and the log alike
            sums["_load"] = self.dist.all_reduce_sum(sums["_load"])
        self.precision.unscale_(self.opt.optimizers)
        gnorm = self._grad_norm()
        # logged values: global per-token LM mean, aux terms averaged over micro-batches and ranks
        logged = {k: v for k, v in sums.items() if not k.startswith("_") and k != "lm"}
        keys = sorted(logged)
        flat = self.dist.all_reduce_sum(torch.stack([logged[k].float().reshape(()) for k in keys]))
        logged = dict(zip(keys, flat))
        lm_mean = logged["lm_sum"] / logged["lm_count"].clamp_min(1)
        per_micro = self.accum * self.dist.world_size
        loss_val = lm_mean + logged["aux_total"] / per_micro
        # one host sync for the check, after the flags' all-reduce
        finite = self.dist.all_true(torch.isfinite(loss_val) & torch.isfinite(gnorm.to(loss_val.device)))
        stepped = False
        if finite:
            stepped = self.precision.step(self.opt.optimizers)
            self.nonfinite_run = 0
            if "_load" in sums and self.recipe.model.moe.bias_balancing and self.gates["moe"].enabled:
                for layer_load, moe in zip(sums["_load"], self._moe_modules()):
                    moe.update_bias(layer_load, pol.aux.moe.bias_update_rate)
        else:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            self.precision.skip_step()  # fp16: back the loss scale off, restart its growth count
        self.grad_acc.zero_grad(self.opt, set_to_none=not self.grads_in_place)
        record = {"kind": "train", "step": step, "lr": lr, "grad_norm": float(gnorm),
                  "loss": float(lm_mean), "total_loss": float(loss_val),
                  "tokens": tokens * self.dist.world_size, "finite": finite, "stepped": stepped,
                  # where a slow step's time goes: waiting for batches, or recompiling
                  "data_seconds": data_seconds}
        if self.compile_info.get("mode", "none") != "none":
            record["recompiles"] = compile_stats().get("recompiles", 0)
        for k in ("stp", "moe_balance", "moe_z", "dsa_indexer", "mtp"):
            if k in logged:
                record[k] = float(logged[k] / per_micro)
        for name, gate in self.gates.gates.items():
            record[f"w_{name}"] = gate.weight_at(step)
        if "_load" in sums:
            load = sums["_load"].sum(0)[: self.recipe.model.moe.num_experts]
            frac = load / load.sum().clamp_min(1)
            record["moe_load_max_frac"] = float(frac.max())
            record["moe_load_min_frac"] = float(frac.min())
        return record

    def _profile_edge(self, stop: bool = False) -> None:
        """Start torch.profiler before step `start`, stop before step `end` and
        write the operators with the most self time (CUDA, then CPU) to profile.txt."""
        if self.profile is None:
            return
        start, end = self.profile
        if self._prof is None and start <= self.step < end:
            from torch.profiler import ProfilerActivity, profile
            cuda = self.device.type == "cuda"
            self._prof_records_host = self.profile_host or not cuda
            acts = ([ProfilerActivity.CPU] if self._prof_records_host else []) + \
                ([ProfilerActivity.CUDA] if cuda else [])
            self._prof = profile(activities=acts)
            self._prof.__enter__()
            self._prof_start = self.step
            self._prof_t0 = time.perf_counter()
        elif self._prof is not None and (stop or self.step >= end):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - self._prof_t0
            self._prof.__exit__(None, None, None)
            prof, self._prof = self._prof, None
            if self.dist.is_main:
                ka = prof.key_averages()
                # wall time of the profiled steps, to set against the self-time totals
                # under each table: GPU busy time well below it means the host is the limit
                parts = [f"steps {self._prof_start}..{self.step - 1}, rank 0, {self.device}, "
                         f"wall {wall * 1e3:.1f} ms ({wall * 1e3 / max(1, self.step - self._prof_start):.1f} ms/step)"]
                if self.device.type == "cuda":
                    # per step: busy vs wall, compute vs exposed communication, kernels by kind
                    # (recording host operators slows the host: idle time reads high unless
                    # --profile-kernels-only)
                    from .kernel_profile import device_events, profile_text, summarize
                    n = max(1, self.step - self._prof_start)
                    kp = summarize(device_events(prof), n, wall * 1e3, top=25)
                    parts += [""] + profile_text("per step", kp)
                    (self.out / "profile_kernels.json").write_text(json.dumps(kp.to_dict(), indent=1) + "\n")
                    parts += ["", "by self CUDA time", ka.table(sort_by="self_cuda_time_total", row_limit=40)]
                if self._prof_records_host:
                    parts += ["", "by self CPU time", ka.table(sort_by="self_cpu_time_total", row_limit=40)]
                else:
                    parts += ["", "(host operators not recorded: --profile-kernels-only)"]
                (self.out / "profile.txt").write_text("\n".join(parts) + "\n")

    def _dsa_dense_stage(self, step: int) -> bool:
        """Set every D layer's stage for this step; True while in the dense warm-up."""
        mods = [m for m in self.model.modules() if getattr(m, "indexer", None) is not None]
        dense = bool(mods) and self.gates["dsa"].enabled and step < self.pol.aux.dsa.dense_warmup_steps
        for m in mods:
            m.sparse = not dense
        return dense

    def _moe_modules(self):
        from ..model.moe import MoE
        return [m for m in self.model.modules() if isinstance(m, MoE)]

    # -------------------------------------------------------------- run
    def run(self) -> RunResult:
        self.t_start = time.time()
        self._build()
        if self.resume:
            self._restore()
        self.out.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.out / "recipe.toml").write_text(self.recipe.to_toml())
        self._write_manifest("running")
        pol = self.pol
        writer = MetricsWriter(self.out, pol.steps, self.step, quiet=self.quiet or not self.dist.is_main) \
            if self.dist.is_main else None
        self.loader_iter = iter(self.loader)
        end_reason = "completed"
        # one nvidia-smi query a second from a thread, main rank only (its card),
        # kept only while the steps after the first CLOCK_WARM_STEPS of this
        # process run (those compile; evaluations and saves are outside too)
        first_timed = self.step + CLOCK_WARM_STEPS
        self.clocks = ClockSampler(self.device, period_ms=1000,
                                   window=f"training steps from step {first_timed + 1}: compile, "
                                          f"evaluations and saves excluded") if self.dist.is_main else None
        if self.clocks is not None:
            self.clocks.gate = False
            self.clocks.__enter__()
        if self.step == 0 and pol.eval_batches > 0:
            self._eval_and_log(writer)
        last_step = self.step
        try:
            with _Signals() as sig:
                while self.step < pol.steps:
                    if self.max_steps is not None and self.step >= self.max_steps:
                        end_reason = "max_steps"
                        break
                    self._profile_edge()
                    if self.clocks is not None:
                        self.clocks.gate = self.step >= first_timed
                    t_step = time.time()
                    rec = self.train_step(self.step)
                    self.step += 1
                    if rec["finite"]:
                        self.tokens_seen += rec["tokens"]
                        l = rec["loss"]
                        self.train_loss_ema = l if self.train_loss_ema is None else 0.9 * self.train_loss_ema + 0.1 * l
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.time()
                    if self.clocks is not None:
                        self.clocks.gate = False
                    dt = max(now - t_step, 1e-9)  # the step alone: eval and saves excluded
                    rec["step_seconds"] = dt
                    rec["tokens_per_s"] = rec["tokens"] / dt
                    rec["mfu"] = (rec["tokens_per_s"] * self.summary.flops_per_token
                                  / (self.peak * self.dist.world_size)) if self.peak else None
                    rec["peak_memory_gib"] = (peak_memory(self.device) or 0) / 2**30
                    if writer:
                        writer.log(rec)
                        if self.step % pol.log_interval == 0 or self.step == pol.steps:
                            extra = "".join(f" {k} {rec[k]:.4f}" for k in ("stp", "moe_balance", "mtp", "dsa_indexer") if k in rec)
                            writer.console(self.step, f"loss {rec['loss']:.4f}{extra} lr {rec['lr']:.2e} "
                                           f"gnorm {rec['grad_norm']:.2f} tok/s {rec['tokens_per_s']:.0f}",
                                           advance=self.step - last_step)
                            last_step = self.step
                    if not rec["finite"]:
                        self.warnings.append(f"step {rec['step']}: non-finite loss or gradient, update skipped")
                        if self.nonfinite_run >= pol.max_nonfinite_steps:
                            end_reason = "nonfinite"
                            break
                    if self.step % pol.eval_interval == 0 and self.step < pol.steps and pol.eval_batches > 0:
                        self._eval_and_log(writer)
                    if self.step % pol.checkpoint_interval == 0 and self.step < pol.steps:
                        self._save()
                    # every rank stops at the same step (the final save is collective)
                    signalled, timed_out = self.dist.any_true(
                        sig.requested is not None,
                        self.time_limit is not None and time.time() - self.t_start > self.time_limit)
                    if signalled:
                        end_reason = f"signal:{sig.requested or 'another rank'}"
                        break
                    if timed_out:
                        end_reason = "time_limit"
                        break
            self._profile_edge(stop=True)  # a run that ends inside the window still writes it
            if end_reason in ("completed",) and pol.eval_batches > 0:
                self._eval_and_log(writer)
            if end_reason != "max_steps":
                self._save()
        except BaseException:
            if writer:
                writer.close()
            raise
        finally:
            if self.clocks is not None:
                self.clocks.__exit__(None, None, None)
        if writer:
            writer.close()
        if end_reason == "nonfinite":
            # the weights were never updated by the bad steps: the saved state is the last good one
            msg = (f"stopped after {pol.max_nonfinite_steps} consecutive non-finite steps at step "
                   f"{self.step}; the last good state is saved in {self.out / 'checkpoints'}")
            self.warnings.append(msg)
        manifest = self._write_manifest("finished" if end_reason == "completed" else "stopped", end_reason)
        vl = self.last_val
        return RunResult(self.out, self.step, end_reason, self.train_loss_ema,
                         vl[0] if vl else None, vl[1] if vl else None, self.first_val_bpb, manifest)

    def _eval_and_log(self, writer) -> None:
        loss, bpb = self.evaluate("val")
        self.last_val, self.last_val_step = (loss, bpb), self.step
        if self.first_val_bpb is None:
            self.first_val_bpb, self.first_val_step = bpb, self.step
        if writer:
            writer.log({"kind": "val", "step": self.step, "loss": loss, "bpb": bpb})
            writer.console(self.step, f"val loss {loss:.4f} bpb {bpb:.4f}")


def moe_wgrad_splits(model) -> int | None:
    """The parts per expert the E layers' grouped weight gradient runs in
    (Experts.wgrad_splits, from policy.kernels.moe_wgrad_splits), None without
    E layers. The FP8 experts and the padded bmm path ignore it."""
    from ..model.moe import Experts
    for m in model.modules():
        if isinstance(m, Experts):
            return m.wgrad_splits
    return None


def _kernel_choice(what: str, fn):
    """fn(): a kernel backend record; a forced backend that cannot run (or a bad
    MEGACPP_* value) is a user error, reported as one line before training starts."""
    try:
        return fn()
    except (RuntimeError, ValueError) as e:
        raise MegacppError(f"{what}: {e}") from None


def _ssd_backend(device, dtype, states: str = "recompute") -> dict:
    """Which Mamba SSD scan the M layers take (triton or the torch reference),
    why, and what its backward does with the chunk states (policy.kernels.ssd_states;
    the reference leaves them to autograd)."""
    from ..ops.ssd import ssd_backend, ssd_backend_reason
    rec = _kernel_choice("Mamba SSD scan", lambda: {"backend": ssd_backend(device, dtype),
                                                    "reason": ssd_backend_reason(device, dtype)})
    rec["chunk_states"] = states if rec["backend"] == "triton" else "autograd (reference)"
    return rec


def conv_paths(model) -> dict:
    """{conv width: {"fwd": path, "bwd": path}} of the Triton conv kernels for the
    model's depthwise convs ("walk" for K <= 4, "tiles" otherwise or where set)."""
    from ..ops.causal_conv import triton_conv as T
    widths = sorted({m.kernel_size[0] for m in model.modules()
                     if isinstance(m, torch.nn.Conv1d) and m.groups == m.in_channels})
    return {str(K): {"fwd": T.path("fwd", K), "bwd": T.path("bwd", K)} for K in widths}


def _conv_backend(device, dtype, model=None) -> dict:
    """Which short causal conv the M and R layers take (triton or the torch
    reference), why, and (Triton) which kernels run for each conv width."""
    from ..ops.causal_conv import conv_backend, conv_backend_reason
    rec = _kernel_choice("causal conv", lambda: {"backend": conv_backend(device, dtype),
                                                 "reason": conv_backend_reason(device, dtype)})
    if rec["backend"] == "triton" and model is not None:
        rec["paths"] = conv_paths(model)
    return rec


def gated_norm_record(model, device, dtype) -> dict:
    """Which gated RMSNorm the M and R layers' output norms take (triton or the
    torch reference) and why. The choice depends on the group's width, so a
    model whose groups differ (nam-125m: Mamba-2's 1536, Gated DeltaNet's 128)
    can take both: then backend is "mixed" and by_group says which width took what."""
    from ..model.norm import GatedRMSNorm
    from ..ops.gated_norm import gated_norm_backend, gated_norm_backend_reason

    groups = sorted({m.group_size for m in model.modules() if isinstance(m, GatedRMSNorm)})
    if not groups:
        return {"backend": None, "reason": "no gated norms (no M or R layers)"}
    recs = {g: _kernel_choice("gated RMSNorm", lambda g=g: {"backend": gated_norm_backend(device, dtype, g),
                                                            "reason": gated_norm_backend_reason(device, dtype, g)})
            for g in groups}
    if len({r["backend"] for r in recs.values()}) == 1:
        return recs[groups[-1]]
    return {"backend": "mixed", "reason": "; ".join(f"{g}: {r['reason']}" for g, r in recs.items() if r["reason"]),
            "by_group": {str(g): r["backend"] for g, r in recs.items()}}


def swiglu_record(model, device, dtype) -> dict:
    """Which SwiGLU the MLP and MoE layers take (triton or the torch reference) and why."""
    from ..ops.swiglu import swiglu_backend, swiglu_backend_reason

    if not any(getattr(m, "activation", None) == "swiglu" for m in model.modules()):
        return {"backend": None, "reason": "no SwiGLU layers"}
    return _kernel_choice("SwiGLU", lambda: {"backend": swiglu_backend(device, dtype),
                                             "reason": swiglu_backend_reason(device, dtype)})


def _delta_rule_backend(model, device, dtype) -> dict:
    """Which gated delta rule the R layers take, and why."""
    from ..model.recurrent import GatedDeltaNet
    from ..ops.delta_rule import delta_rule_backend, delta_rule_backend_reason

    layers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    if not layers:
        return {"backend": None, "reason": "no R layers"}
    from ..ops.delta_rule.dispatch import fla_reason

    m = layers[0]

    def choice() -> dict:
        backend = delta_rule_backend(device, dtype, m.chunk_size, m.dk)
        why = delta_rule_backend_reason(device, dtype, m.chunk_size, m.dk)
        if backend == "triton":  # the project's kernels: why not flash-linear-attention's
            why = f"not fla: {fla_reason(device, m.chunk_size)}"
        rec = {"backend": backend, "reason": why}
        if backend == "triton":  # policy.kernels.delta_states (fla and the reference ignore it)
            rec["intermediates"] = "keep" if m.keep_delta_states else "recompute"
        return rec
    return _kernel_choice("gated delta rule", choice)


def linear_ce_dw_path(model) -> str | None:
    """How the Triton head accumulated its weight gradient ("addmm out_dtype", ...),
    once it has run; None for another backend or before its first call."""
    import sys
    mod = sys.modules.get("megacpp.ops.linear_ce.triton_linear_ce")
    if getattr(model, "lm_loss_backend", None) != "triton" or mod is None:
        return None
    return mod.DW_PATH


def _attention_backend(model, device) -> str:
    """Which attention kernel the model's packed rows take (sdpa with a mask, flex, both, none)."""
    from ..model.attention import flex_launch_note, model_attention_backend
    kind = model_attention_backend(model, device)
    return f"{kind} ({flex_launch_note(model, device)})" if "flex" in kind else kind


def bits_per_byte(loss_nats: float, snapshot, split: str) -> float:
    """Loss per token -> bits per UTF-8 byte, using the split's bytes/token ratio."""
    info = snapshot.manifest["splits"][split]
    tokens, nbytes = info["tokens"], info["bytes"]
    if not tokens or not nbytes:
        return float("nan")
    return loss_nats / LN2 * tokens / nbytes


def train(recipe: Recipe, out_dir, data_dir=None, resume=False, device=None, quiet=False,
          max_steps=None) -> RunResult:
    return Trainer(recipe, out_dir, data_dir, resume, device, quiet, max_steps=max_steps).run()
