"""Run under torchrun (2 processes): gradient accumulation and grad norm through DistContext.

    python -m torch.distributed.run --nproc_per_node 2 dist_grads_worker.py ddp|fsdp2|fsdp2-keep|fsdp2-compute

A toy stack of layers, wrapped like the trainer wraps HybridLM, takes two
micro-batches per rank. Checks: no gradient communication on the first one
(DDP: ranks' gradients still differ; FSDP2: nothing reduce-scattered yet),
after the last one the gradients equal a one-process model's over the whole
global batch, and grad_norm_ returns (and clips with) the global norm.
fsdp2-keep: reshard_after_forward false: the weights gathered for the first
micro-batch stay gathered into the second (no all-gather per micro-batch),
and the gradients are still those of one process.
fsdp2-compute: policy.parallel.gather="compute" under bf16 autocast: the
GEMM weights are gathered in bf16 and the LayerNorms are replicated; their
gradients must be the average over the ranks after sync_replicated_grads,
equal on every rank, and the grad norm must count sharded and replicated
gradients alike. Exits non-zero with a message on any mismatch.
"""
from __future__ import annotations

import copy
import sys
from types import SimpleNamespace

import torch

from megacpp.train.distributed import from_env, grad_norm_

D, MICRO, ROWS = 16, 2, 3  # width, micro-batches per rank, rows per micro-batch


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(D, D)
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Tanh())
                                          for _ in range(3))

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return x


class ToyNorm(Toy):
    """Layers with a LayerNorm: parameters gather="compute" leaves replicated."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.LayerNorm(D),
                                                              torch.nn.Tanh()) for _ in range(3))


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check(ok: bool, what: str) -> None:
    if not ok:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def main_compute() -> None:
    from megacpp.recipe.policy import ParallelSpec
    from megacpp.train.distributed import DistContext

    dist = from_env("fsdp2", "cpu")
    W = dist.world_size
    torch.manual_seed(0)
    model = ToyNorm()
    recipe = SimpleNamespace(policy=SimpleNamespace(
        precision=SimpleNamespace(params="fp32", compute="bf16", fp32_modules=("norm",)),
        parallel=ParallelSpec(gather="compute")))
    wrapped = dist.wrap(model, recipe)
    rep = dist.replicated
    check(len(rep) == 6 and all(p.dim() == 1 for p in rep), f"replicated {[tuple(p.shape) for p in rep]}")
    check(all(not hasattr(p, "full_tensor") for p in rep), "a replicated parameter is a DTensor")
    check(all(hasattr(l[0].weight, "full_tensor") for l in model.layers), "a GEMM weight is not sharded")
    data = torch.randn(W, ROWS, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = wrapped(data[dist.rank])
    (out.float().pow(2).sum() * W / (W * ROWS)).backward()
    local = [p.grad.clone() for p in rep]
    every = dist.all_gather_object(local)
    check(not all(torch.equal(a, b) for a, b in zip(every[0], every[1])), "replicated grads equal before sync")
    DistContext.sync_replicated_grads(dist)
    for i, p in enumerate(rep):
        want = sum(e[i] for e in every) / W
        check(torch.allclose(p.grad, want, rtol=1e-6, atol=1e-8), f"replicated gradient {i} is not the mean")
    after = dist.all_gather_object([p.grad for p in rep])
    check(all(torch.equal(a, b) for a, b in zip(after[0], after[1])), "replicated grads differ after sync")
    grads = [full(p.grad) for p in model.parameters() if p.grad is not None]
    want = torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads]))
    norm = grad_norm_(list(model.parameters()), float(want) / 2)
    check(torch.allclose(norm, want, rtol=1e-5), f"mixed norm {float(norm)} != {float(want)}")
    again = torch.linalg.vector_norm(torch.stack([full(p.grad).float().norm() for p in model.parameters()
                                                  if p.grad is not None]))
    check(abs(float(again) - float(want) / 2) < 1e-4 * float(want), "mixed gradients not clipped alike")
    if dist.is_main:
        print(f"ok fsdp2-compute world {W}")


def main(sharding: str) -> None:
    if sharding == "fsdp2-compute":
        return main_compute()
    from torch.distributed.tensor import DTensor

    from megacpp.recipe.policy import ParallelSpec
    keep = sharding == "fsdp2-keep"
    sharding = "fsdp2" if keep else sharding
    dist = from_env(sharding, "cpu")
    W = dist.world_size
    torch.manual_seed(0)
    ref = Toy().double()
    model = copy.deepcopy(ref)
    recipe = SimpleNamespace(policy=SimpleNamespace(precision=SimpleNamespace(params="fp32", compute="fp32"),
                                                    parallel=ParallelSpec(reshard_after_forward=not keep)))
    if sharding == "fsdp2":
        model = model.float()
        ref = ref.float()
    wrapped = dist.wrap(model, recipe)
    data = torch.randn(W * MICRO, ROWS, D, dtype=next(ref.parameters()).dtype)
    n_global = data.shape[0] * ROWS
    # the trainer's normalisation: sum over this rank's rows x world size / global count
    # (DDP and FSDP2 average over ranks, so the result is the global mean)
    for j in range(MICRO):
        x = data[dist.rank * MICRO + j]
        with dist.no_sync(wrapped, last=j == MICRO - 1):
            (wrapped(x).pow(2).sum() * W / n_global).backward()
        if j == 0 and sharding == "ddp":
            mine = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            both = dist.all_gather_object(mine)
            check(not torch.allclose(both[0], both[1]), "DDP all-reduced a non-final micro-batch")
        if j == 0 and sharding == "fsdp2":
            # not reduce-scattered: no sharded gradient yet (kept gathered: the
            # unsharded weights hold this rank's unreduced gradient)
            check(all((p.grad is not None and not isinstance(p.grad, DTensor)) if keep else p.grad is None
                      for p in model.parameters()), "FSDP2 reduce-scattered a non-final micro-batch")
            gathered = not isinstance(model.layers[0][0].weight, DTensor)
            check(gathered == keep, f"after a non-final backward the weights are "
                                    f"{'gathered' if gathered else 'sharded'} (keep_gathered={keep})")
    ref(data.reshape(-1, D)).pow(2).sum().div(n_global).backward()
    tol = dict(rtol=1e-5, atol=1e-7)
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        check(torch.allclose(full(p.grad), r.grad, **tol), f"{sharding} gradient of {name}")
    ref_norm = torch.linalg.vector_norm(torch.stack([r.grad.norm() for r in ref.parameters()]))
    params = list(model.parameters())
    norm = grad_norm_(params, 0.0)
    check(not hasattr(norm, "full_tensor"), "grad_norm_ returned a DTensor")
    check(torch.allclose(norm, ref_norm, **tol), f"unclipped norm {float(norm)} != {float(ref_norm)}")
    clip = float(ref_norm) / 4
    norm = grad_norm_(params, clip)
    check(torch.allclose(norm, ref_norm, **tol), "norm returned while clipping")
    coef = clip / (float(ref_norm) + 1e-6)
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        check(torch.allclose(full(p.grad), r.grad * coef, **tol), f"clipped gradient of {name}")
    after = grad_norm_(params, 0.0)
    check(abs(float(after) - clip) < 1e-4 * clip, f"norm after clipping {float(after)} != {clip}")
    if sharding == "fsdp2":  # the last backward resharded, kept or not
        check(isinstance(model.layers[0][0].weight, DTensor), "the weights stayed gathered after the step")
    if dist.is_main:
        print(f"ok {'fsdp2-keep' if keep else sharding} world {W}")


if __name__ == "__main__":
    main(sys.argv[1])
