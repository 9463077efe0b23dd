"""Data parallelism applied from outside the model (the model never knows).

`DistContext` is what the trainer sees: rank, world size, the device, how to
wrap the model (none, DDP or FSDP2 `fully_shard` per layer and at the root),
how to skip gradient sync on non-final micro-batches, and the few
collectives the loop and the checkpoints need. `single_process()` is the
one-device case; `from_env()` reads torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK) and initialises the process group (NCCL on CUDA,
gloo on CPU).

Only data parallelism is implemented: tensor, context, expert (all-to-all)
and pipeline degrees > 1 are refused by recipe validation.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    sharding: str = "none"
    device: torch.device | None = None
    backend: str | None = None
    local_world_size: int = 1
    # "file" (model.safetensors + state.pt, one process) or "dcp" (sharded,
    # torch.distributed.checkpoint). Chosen at the first start and kept on
    # resume, so one run has one format; the trainer sets it from the
    # checkpoint it resumes.
    checkpoint_format: str = "file"
    mixed_precision: dict | None = None
    # parameters FSDP2 leaves unsharded (policy.parallel.gather="compute"):
    # their gradients are all-reduced by sync_replicated_grads
    replicated: list = dataclasses.field(default_factory=list)
    # FSDP2 with reshard_after_forward false: the gathered weights also stay
    # from one micro-batch's backward to the next one's forward (one
    # all-gather per step, not one per micro-batch)
    keep_gathered: bool = False
    # what the gradients are averaged over the ranks in (policy.parallel.reduce)
    reduce_dtype: str = "float32"

    def __post_init__(self):
        if self.world_size > 1:
            self.checkpoint_format = "dcp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------ wrapping
    def wrap(self, model: torch.nn.Module, recipe) -> torch.nn.Module:
        """The module the training forward goes through; `model` keeps its names."""
        if not self.active or self.sharding == "none":
            if self.active:
                from ..errors import MegacppError
                raise MegacppError("policy.parallel.sharding: 'none' with several processes; use ddp or fsdp2")
            return model
        if self.sharding == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (the MoE expert bias) are updated from all-reduced loads, so
            # they are already equal on every rank: no per-forward broadcast.
            ddp = DDP(model, device_ids=ids, forward_sync_buffers=False)
            if recipe.policy.parallel.reduce == "compute":  # validated: bf16 compute
                ddp.register_comm_hook(self.world_size, _bf16_mean_hook)
                self.reduce_dtype = "bfloat16"
            return ddp
        self.mixed_precision, self.replicated = fsdp2(model, recipe)
        self.reduce_dtype = self.mixed_precision["reduce_dtype"]
        self.keep_gathered = not recipe.policy.parallel.reshard_after_forward
        return model

    def no_sync(self, model, last: bool):
        """Gradient accumulation: reduce only on the last micro-batch of a step."""
        if not self.active or last:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):  # DDP
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(model, keep_gathered=self.keep_gathered)
        return contextlib.nullcontext()

    # ------------------------------------------------------------ collectives
    def sync_replicated_grads(self) -> None:
        """Average the gradients of the parameters FSDP2 replicates, as its
        reduce-scatter averages the sharded ones: one flat all-reduce."""
        grads = [p.grad for p in self.replicated if p.grad is not None]
        if not self.active or not grads:
            return
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        flat /= self.world_size
        torch._foreach_copy_(grads, [v.view_as(g) for v, g in zip(flat.split([g.numel() for g in grads]), grads)])

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_true(self, flag) -> bool:
        """flag (a bool, or a bool tensor still on the device) set on every rank.
        A tensor costs one host sync in all, after the all-reduce."""
        if isinstance(flag, torch.Tensor):
            if not self.active:
                return bool(flag)
            t = (~flag).float().reshape(1)
        elif not self.active:
            return flag
        else:
            t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return float(t) == 0.0

    def any_true(self, *flags: bool) -> list[bool]:
        """Per flag: set on some rank. One all-reduce for all of them."""
        if not self.active:
            return [bool(f) for f in flags]
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return [bool(v > 0) for v in t.tolist()]

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (picklable)."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if not self.active:
            return [obj]
        out = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------ record
    def describe(self) -> dict:
        """The layout for the run manifest."""
        d = {"world_size": self.world_size, "data_parallel": self.world_size,
             "sharding": self.sharding if self.active else "none",
             "tensor_parallel": 1, "context_parallel": 1, "expert_parallel": 1,
             "pipeline_parallel": 1,
             "nodes": max(1, self.world_size // max(1, self.local_world_size)),
             "processes_per_node": self.local_world_size,
             "backend": self.backend, "nccl": nccl_version() if self.backend == "nccl" else None,
             "launcher": "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else
                         ("env" if self.active else None),
             "checkpoint_format": self.checkpoint_format,
             "grad_reduce_dtype": self.reduce_dtype if self.active else None,
             "grad_sync": ("once per step (no_sync / set_requires_gradient_sync(False) on "
                           "non-final micro-batches)") if self.active else None}
        if self.mixed_precision is not None:
            d["fsdp2_mixed_precision"] = dict(self.mixed_precision)
            d["fsdp2_keep_gathered_across_micro_batches"] = self.keep_gathered
        return d


def _bf16_mean_hook(world_size: int, bucket):
    """DDP comm hook: average a gradient bucket over the ranks in bf16, back
    into the float32 bucket. (torch's own bf16 hook refuses gloo.)"""
    buf = bucket.buffer()
    half = buf.to(torch.bfloat16).div_(world_size)
    fut = tdist.all_reduce(half, async_op=True).get_future()

    def unpack(f):
        buf.copy_(f.value()[0])
        return buf
    return fut.then(unpack)


def nccl_version() -> str | None:
    try:
        return ".".join(map(str, torch.cuda.nccl.version()))
    except Exception:
        return None


@contextlib.contextmanager
def _fsdp_no_sync(model, keep_gathered: bool = False):
    model.set_requires_gradient_sync(False)
    if keep_gathered:
        model.set_reshard_after_backward(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
        if keep_gathered:
            model.set_reshard_after_backward(True)


def gemm_modules(layer: torch.nn.Module, fp32_modules) -> list[torch.nn.Module]:
    """The submodules of `layer` whose weights only ever enter autocast GEMMs.

    Plain nn.Linear (not a subclass: FP8/NVFP4 replacements scale from the
    stored weight) and MoE expert stacks, minus names matching fp32_modules
    (the router computes in float32 with autocast off). Autocast rounds their
    float32 weights to the compute dtype before every use, so all-gathering
    them already rounded gives the same forward and the same gradients.
    """
    from ..model.moe import Experts
    from .lowp.plan import name_match

    out = []
    for name, m in layer.named_modules():
        if not (type(m) is torch.nn.Linear or isinstance(m, Experts)):
            continue
        if name_match(name, fp32_modules) is not None:
            continue
        ps = list(m.parameters(recurse=False))
        if ps and all(p.dtype == torch.float32 and p.requires_grad for p in ps):
            out.append(m)
    return out


def fsdp2(model: torch.nn.Module, recipe) -> tuple[dict, list[torch.nn.Parameter]]:
    """`fully_shard` the layers (and MTP depths) in groups, then the root.

    Parameters are stored in policy.precision.params and the compute dtype
    comes from autocast, exactly as on one device. Gradients are reduced in
    float32, or in bf16 with policy.parallel.reduce = "compute". Each group is whole layers (policy.parallel.group_layers of
    them), so FSDP2's hooks sit on the modules the trainer compiles and the
    compiled graphs are those of one process.

    policy.parallel.gather (with float32 storage and bf16/fp16 compute):
    - "storage": every parameter all-gathered in float32.
    - "compute": the GEMM weights (`gemm_modules`) all-gathered in the compute
      dtype, which autocast would round them to anyway (half the bytes, the
      same numbers); the group's other parameters (norms, SSM A_log/D/dt_bias,
      routers, convs: a bf16 gather would round them) are left out of FSDP,
      replicated, and their gradients all-reduced by `sync_replicated_grads`.
    - "compute_subgroups": the GEMM weights as a float-compute sub-group of
      their own, the rest in float32; the sub-group's hooks split the
      compiled layer graphs (kept to measure that).

    Every group costs the host its hooks and collectives each step.
    policy.parallel.reshard_after_forward=false keeps the gathered weights
    until the backward (one all-gather per group and step, not two); the last
    group never reshards, its backward runs right away. prefetch_groups: how
    many groups ahead the forward all-gather is issued from the CPU.
    Returns (the policy for the manifest, the replicated parameters).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    from ..errors import MegacppError
    from .precision import DTYPES

    prec, par = recipe.policy.precision, recipe.policy.parallel
    stored, compute = DTYPES[prec.params], DTYPES[prec.compute]
    reduce = compute if par.reduce == "compute" else torch.float32
    # cast_forward_inputs off: the stream between layers keeps the recipe's dtype
    # (policy.precision.residual); FSDP2 would otherwise cast a bf16 stream back
    # up to the float32 storage dtype at every group's input
    mp = MixedPrecisionPolicy(param_dtype=stored, reduce_dtype=reduce, cast_forward_inputs=False)
    lowp = stored == torch.float32 and compute in (torch.bfloat16, torch.float16)
    gemm_dtype = compute if (lowp and par.gather != "storage") else None
    # cast_forward_inputs off: FSDP2 would otherwise round each layer's input
    # (the residual stream) to the gather dtype; autocast rounds GEMM inputs itself
    gemm_mp = MixedPrecisionPolicy(param_dtype=gemm_dtype, reduce_dtype=reduce, cast_forward_inputs=False)
    k = max(1, par.group_layers)
    layers = list(model.layers)
    groups = [layers[i:i + k] for i in range(0, len(layers), k)] + [[m] for m in getattr(model, "mtp", [])]
    gemm_groups = gemm_params = 0
    replicated: list[torch.nn.Parameter] = []
    handles = []
    for gi, group in enumerate(groups):
        reshard = par.reshard_after_forward and gi < len(groups) - 1
        gemms = [m for layer in group for m in gemm_modules(layer, prec.fp32_modules)] if gemm_dtype else []
        if gemms:
            gemm_groups += 1
            gemm_params += sum(p.numel() for m in gemms for p in m.parameters())
        if gemms and par.gather == "compute_subgroups":
            fully_shard(gemms, mp_policy=gemm_mp, reshard_after_forward=reshard)  # one all-gather
        ignored = None
        if gemms and par.gather == "compute":
            in_gemms = {id(p) for m in gemms for p in m.parameters()}
            ignored = {p for m in group for p in m.parameters() if id(p) not in in_gemms}
            replicated += [p for p in ignored if p.requires_grad]
        # DTensors are already sharded, in a finer group
        dtypes = {p.dtype for m in group for p in m.parameters()
                  if p.requires_grad and not isinstance(p, DTensor) and not (ignored and p in ignored)}
        if len(dtypes) > 1:
            raise MegacppError(
                f"policy.parallel.sharding: fsdp2 shards each group of layers as one flat group of one "
                f"dtype, but group {gi} (layers {gi * k}..{gi * k + len(group) - 1}) holds "
                f"{sorted(str(d).replace('torch.', '') for d in dtypes)} "
                f"parameters (policy.precision.params={prec.params} keeps fp32_modules in "
                f"float32); use ddp, or policy.precision.params=fp32")
        target = group if len(group) > 1 else group[0]
        if ignored is not None:
            fully_shard(target, mp_policy=gemm_mp, reshard_after_forward=reshard, ignored_params=ignored)
        else:
            fully_shard(target, mp_policy=mp, reshard_after_forward=reshard)
        handles.append(group[0])
    for i, h in enumerate(handles):
        ahead = handles[i + 1:i + 1 + par.prefetch_groups]
        if ahead:
            h.set_modules_to_forward_prefetch(ahead)
    # The root keeps embed, final norm and head; the head weight is read after
    # the forward by the LM loss, which FSDP2 allows since the root is not
    # resharded between its forward and backward.
    rep = {id(p) for p in replicated}
    dtypes = {p.dtype for p in model.parameters()
              if p.requires_grad and not isinstance(p, DTensor) and id(p) not in rep}
    if len(dtypes) > 1:
        raise MegacppError(
            f"policy.parallel.sharding: fsdp2 shards the root (embeddings, final norm, head) as one "
            f"group of one dtype, but it holds {sorted(str(d).replace('torch.', '') for d in dtypes)} "
            f"parameters; use ddp, or policy.precision.params=fp32")
    fully_shard(model, mp_policy=mp, ignored_params=set(replicated) or None)
    name = lambda d: None if d is None else str(d).replace("torch.", "")  # noqa: E731
    return {"param_dtype": name(stored), "reduce_dtype": name(reduce),
            "compute": prec.compute + " (autocast)", "groups": len(groups) + 1,
            "layers_per_group": k, "reshard_after_forward": par.reshard_after_forward,
            "prefetch_groups": par.prefetch_groups, "gather": par.gather,
            "gemm_param_dtype": name(gemm_dtype), "gemm_groups": gemm_groups,
            "gemm_params": gemm_params, "replicated_params": sum(p.numel() for p in replicated)}, replicated


def grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global L2 norm of the gradients (a plain tensor), clipping to max_norm when > 0.

    FSDP2 gradients are DTensor shards: their norm is a partial value that
    `full_tensor()` reduces over the ranks, so every rank sees (and clips
    with) the same global norm. Plain gradients next to them (the parameters
    FSDP2 replicates) are whole on every rank and count once. The two kinds
    are normed and clipped apart: one foreach call cannot mix them.
    """
    from torch.distributed.tensor import DTensor

    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    kinds = [[p for p in with_grad if isinstance(p.grad, DTensor)],
             [p for p in with_grad if not isinstance(p.grad, DTensor)]]
    kinds = [k for k in kinds if k]
    norms = []
    for kind in kinds:
        n = torch.nn.utils.get_total_norm([p.grad for p in kind], 2.0, error_if_nonfinite=False, foreach=True)
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        for kind in kinds:
            torch.nn.utils.clip_grads_with_norm_(kind, max_norm, total, foreach=True)
    return total


def layout_free_hash(recipe) -> str:
    """The recipe hash with the parallel layout and the micro-batch size reset.

    The gradient of a step does not depend on how the global batch is split
    over ranks and micro-batches, so a checkpoint may resume under another
    split when everything else is equal. The gradient reduce's dtype
    (policy.parallel.reduce) stays: a bf16 reduce rounds the gradients.
    """
    from ..recipe import io

    pol = recipe.policy
    blank = dataclasses.replace(pol, parallel=type(pol.parallel)(reduce=pol.parallel.reduce), micro_batch=0)
    return io.canonical_hash({"model": recipe.model, "policy": blank})


def reshard_loader_state(state: dict, loader) -> dict:
    """A loader state saved under another (world size, batch size), for `loader`.

    Rank r of w reads every w-th row of the epoch's permutation starting at r,
    so after `batch` batches of `batch_size` on every rank the ranks together
    have consumed the first batch * batch_size * world_size rows of the
    epoch: the global position, which does not depend on the layout.
    """
    keys = ("rank", "world_size", "batch_size")
    if all(state.get(k) == getattr(loader, k) for k in keys):
        return state
    from ..errors import MegacppError

    rows = int(state["batch"]) * int(state["batch_size"]) * int(state["world_size"])
    per = loader.batch_size * loader.world_size
    if rows % per:
        raise MegacppError(f"loader state: {rows} rows of epoch {state['epoch']} were consumed, not a "
                           f"multiple of micro_batch x world size = {per}; resume with a layout "
                           f"that divides it")
    # an epoch of the new layout may be a few rows shorter (drop_last): then it is over
    batch = min(rows // per, len(loader))
    return {**state, "rank": loader.rank, "world_size": loader.world_size,
            "batch_size": loader.batch_size, "batch": batch}


def eval_batches_per_rank(batches: int, world_size: int) -> int:
    """Eval batches counts micro-batches of the whole job: each rank takes its share."""
    return math.ceil(batches / world_size) if batches else 0


def single_process() -> DistContext:
    return DistContext()


def from_env(sharding: str, device: str | None = None) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        ctx = DistContext(sharding=sharding)
        if device:
            ctx.device = torch.device(device)
        return ctx
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend, device_id=dev if use_cuda else None)
        atexit.register(_destroy)
    return DistContext(rank, world, local, sharding, dev, backend, local_world)


def _destroy() -> None:
    # Free a DDP wrapper (its reducer owns gloo/NCCL work) before the process
    # group goes: one torn down during interpreter shutdown can abort the exit.
    gc.collect()
    if tdist.is_initialized():
        tdist.destroy_process_group()
