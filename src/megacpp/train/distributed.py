"""Data parallelism applied from outside the model (the model never knows).

`DistContext` is what the trainer sees: rank, world size, the device, how to
wrap the model (none, DDP or FSDP2 `fully_shard` per layer and at the root),
how to skip gradient sync on non-final micro-batches, and two collectives.
`single_process()` is the one-device case; `from_env()` reads torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK) and initialises the process group
(NCCL on CUDA, gloo on CPU).
"""
from __future__ import annotations

import contextlib
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: torch.nn.Module, recipe) -> torch.nn.Module:
        if not self.active or self.sharding == "none":
            if self.active:
                from ..errors import MegacppError
                raise MegacppError("policy.parallel.sharding: 'none' with several processes; use ddp or fsdp2")
            return model
        if self.sharding == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(model, device_ids=ids, broadcast_buffers=False)
        return fsdp2(model, recipe, self.device)

    def no_sync(self, model, last: bool):
        if not self.active or last:
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):  # DDP
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            return _fsdp_no_sync(model)
        return contextlib.nullcontext()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def all_true(self, flag: bool) -> bool:
        if not self.active:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return float(t) == 0.0

    def describe(self) -> dict:
        d = {"world_size": self.world_size, "sharding": self.sharding, "backend": self.backend,
             "data_parallel": self.world_size}
        return d


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def fsdp2(model: torch.nn.Module, recipe, device: torch.device) -> torch.nn.Module:
    """`fully_shard` each layer, then the root; mixed precision from the recipe."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from .precision import DTYPES

    compute = DTYPES[recipe.policy.precision.compute]
    mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


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
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not tdist.is_initialized():
        tdist.init_process_group(backend=backend)
    return DistContext(rank, world, local, sharding, dev, backend)
