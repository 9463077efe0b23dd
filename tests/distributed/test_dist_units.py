"""The parts of data parallelism that can be checked without a training run."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megacpp import load_recipe
from megacpp.data.loader import PackedLoader
from megacpp.errors import MegacppError
from megacpp.train.distributed import fsdp2, layout_free_hash, reshard_loader_state

from dist_testutil import env, free_port, snapshot, tiny_sets

HERE = Path(__file__).parent


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2", "fsdp2-keep", "fsdp2-compute"])
def test_accumulation_syncs_once_and_grad_norm_is_global(sharding):
    """Two ranks, two micro-batches each: see dist_grads_worker.py for the checks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(HERE / "dist_grads_worker.py"), sharding]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert f"ok {sharding} world 2" in p.stdout


def _rows(batches) -> list[tuple]:
    return sorted(tuple(r.tolist()) for b in batches for r in b["input_ids"])


def test_loader_position_moves_to_another_world_size(tmp_path_factory):
    snap = snapshot(tmp_path_factory)
    if snap is None:
        pytest.skip("no libstdc++ headers on this machine")
    # two ranks with batches of 2 have each handed out 3 batches: 12 rows of the epoch
    old = [PackedLoader(snap, "train", 2, seed=5, rank=r, world_size=2, drop_last=True, prefetch=1)
           for r in range(2)]
    its = [iter(l) for l in old]
    for it in its:
        for _ in range(3):
            next(it)
    state = old[0].state_dict()
    old_next = _rows([next(it) for it in its for _ in range(2)])  # the next 8 rows, both ranks
    # one process with batches of 4 continues with exactly those rows
    new = PackedLoader(snap, "train", 4, seed=5, drop_last=True, prefetch=1)
    moved = reshard_loader_state(state, new)
    assert moved["batch"] == 3 and moved["world_size"] == 1 and moved["rank"] == 0
    new.load_state_dict(moved)
    it = iter(new)
    assert _rows([next(it), next(it)]) == old_next
    # four ranks with batches of 1 (rank 3 of 4 here): 12 rows = 3 batches each
    four = PackedLoader(snap, "train", 1, seed=5, rank=3, world_size=4, drop_last=True, prefetch=1)
    assert reshard_loader_state(state, four)["batch"] == 3
    # a layout whose global batch does not divide the position is refused
    five = PackedLoader(snap, "train", 5, seed=5, drop_last=True, prefetch=1)
    with pytest.raises(MegacppError, match="12 rows of epoch 0"):
        reshard_loader_state(state, five)
    # the same layout is left alone
    assert reshard_loader_state(state, old[0]) is state
    for l in old + [new, four, five]:
        l.close()


def test_layout_free_hash_ignores_only_the_split():
    base = load_recipe("nam-tiny", tiny_sets())
    split = load_recipe("nam-tiny", tiny_sets(**{"policy.parallel.data": 2, "policy.parallel.sharding": "fsdp2",
                                                 "policy.micro_batch": 4}))
    other = load_recipe("nam-tiny", tiny_sets(**{"policy.optimizer.lr": 1e-3}))
    assert base.hash != split.hash
    assert layout_free_hash(base) == layout_free_hash(split)
    assert layout_free_hash(base) != layout_free_hash(other)
    # a bf16 gradient reduce rounds the gradients: not a mere split
    bf16 = {"policy.precision.compute": "bf16"}
    f32_reduce = load_recipe("nam-tiny", tiny_sets(**bf16, **{"policy.parallel.data": 2}))
    bf16_reduce = load_recipe("nam-tiny", tiny_sets(**bf16, **{"policy.parallel.data": 2,
                                                               "policy.parallel.reduce": "compute"}))
    assert layout_free_hash(f32_reduce) != layout_free_hash(bf16_reduce)


def test_fsdp2_refuses_mixed_dtype_layer():
    """FSDP2 flattens a group into one dtype; mixed storage needs a clear error, not an assert."""
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4).to(torch.bfloat16)
            self.A_log = torch.nn.Parameter(torch.zeros(4))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer()])

    recipe = load_recipe("nam-tiny", tiny_sets(**{"policy.precision.compute": "bf16"}))
    with pytest.raises(MegacppError, match=r"group 0 \(layers 0..0\) holds \['bfloat16', 'float32'\]"):
        fsdp2(Model(), recipe)


@contextlib.contextmanager
def _one_process_group():
    """A one-process gloo group (rank 0 of 1) for FSDP2 on CPU, destroyed after."""
    import tempfile

    import torch.distributed as tdist

    init = tempfile.NamedTemporaryFile(delete=False)
    tdist.init_process_group("gloo", init_method=f"file://{init.name}", rank=0, world_size=1)
    try:
        yield
    finally:
        tdist.destroy_process_group()


def _graphs_under_fsdp2(sets: list[str] | None) -> dict:
    """Dynamo's graphs and breaks for one bf16-autocast forward+backward of a
    4-layer nam-tiny whose layers are compiled one by one, as the trainer
    does, under fsdp2 (a one-process gloo group) or (sets None) unsharded."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    import megacpp
    from megacpp.train.compile import apply_compile

    recipe = load_recipe("nam-tiny", tiny_sets(**{"model.depth": 4, "model.pattern": "AEMR",
                                                  "policy.precision.compute": "bf16"}) + (sets or []))
    torch.manual_seed(0)
    model = megacpp.build_model(recipe.model)
    with _one_process_group() if sets is not None else contextlib.nullcontext():
        try:
            if sets is not None:
                fsdp2(model, recipe)
            torch._dynamo.reset()
            counters.clear()
            compile_spec = type(recipe.policy.compile)(mode="default", scope="block", fullgraph=False)
            apply_compile(model, compile_spec)
            for layer in model.layers:  # the graph structure is the question, not inductor's code
                layer._compiled_call_impl = torch.compile(layer._call_impl, backend="eager")
            ids = torch.randint(0, recipe.model.vocab_size, (1, 32))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(ids)
            out.hidden.float().square().mean().backward()
            return {"graphs": int(counters["stats"]["unique_graphs"]),
                    "breaks": int(sum(counters["graph_break"].values()))}
        finally:
            torch._dynamo.reset()


def test_fsdp2_keeps_the_compiled_layer_graphs():
    """FSDP2 hooks on modules inside a compiled layer split its graph (each hook
    is a dynamo-skipped call): the fifth session's 2-GPU collapse. The default
    groups whole layers, so the compiled graphs are those of one process."""
    plain = _graphs_under_fsdp2(None)
    sharded = _graphs_under_fsdp2(["policy.parallel.group_layers=2"])
    compute = _graphs_under_fsdp2(["policy.parallel.gather=compute"])
    sub = _graphs_under_fsdp2(["policy.parallel.gather=compute_subgroups"])
    assert plain["breaks"] == 0 and sharded == plain and compute == plain, (plain, sharded, compute)
    assert sub["breaks"] > 0 and sub["graphs"] > plain["graphs"], sub  # the check can fail


@pytest.mark.parametrize("gather", ["storage", "compute", "compute_subgroups"])
def test_split_in_proj_under_fsdp2_follows_the_unsharded_model(gather):
    """policy.kernels.mamba_in_proj = "split" under FSDP2 (a one-process gloo
    group): where the layer is one group its in_proj weight is gathered
    before the forward and the split runs; where in_proj is a group of its
    own ("compute_subgroups") its hook needs the module call, so the layer
    takes one GEMM. Either way loss and gradients follow the unsharded model."""
    import megacpp
    from megacpp.train.activation import apply_mamba_in_proj, mamba_in_proj_split

    recipe = load_recipe("nam-tiny", tiny_sets(**{"model.depth": 4, "model.pattern": "AEMR",
                                                  "model.mamba.version": 2,
                                                  "policy.precision.compute": "bf16",
                                                  "policy.parallel.gather": gather,
                                                  "policy.kernels.mamba_in_proj": "split"}))
    ids = torch.randint(0, recipe.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))

    def run(shard: bool):
        torch.manual_seed(0)
        model = megacpp.build_model(recipe.model)
        assert apply_mamba_in_proj(model, "split") == 1
        if shard:
            fsdp2(model, recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids).hidden.float().square().mean()
        loss.backward()
        w = model.layers[2].mamba.in_proj.weight
        g = w.grad.full_tensor() if hasattr(w.grad, "full_tensor") else w.grad
        return loss.detach(), g, mamba_in_proj_split(model)

    want_loss, want_g, n = run(False)
    assert n == 1
    with _one_process_group():
        loss, g, n = run(True)
    assert n == (0 if gather == "compute_subgroups" else 1)
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(g.float(), want_g.float(), rtol=2e-2, atol=1e-6)


@pytest.mark.parametrize("gather", ["storage", "compute", "compute_subgroups"])
@pytest.mark.parametrize("residual", ["fp32", "compute"])
def test_fsdp2_keeps_the_recipes_residual_dtype(gather, residual):
    """policy.precision.residual under FSDP2 (a one-process gloo group): every
    layer's output keeps the stream's dtype in every gather mode (FSDP2's
    input cast would have put a bf16 stream back in float32 at each group)."""
    import megacpp
    from megacpp.train.precision import Precision

    recipe = load_recipe("nam-tiny", tiny_sets(**{"model.depth": 4, "model.pattern": "AEMR",
                                                  "policy.precision.compute": "bf16",
                                                  "policy.precision.residual": residual,
                                                  "policy.parallel.gather": gather}))
    with _one_process_group():
        torch.manual_seed(0)
        model = megacpp.build_model(recipe.model)
        Precision(recipe.policy.precision, torch.device("cpu")).apply(model)
        fsdp2(model, recipe)
        ids = torch.randint(0, recipe.model.vocab_size, (2, 32))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(ids, collect_hidden=[0, 1, 2, 3])
    want = torch.bfloat16 if residual == "compute" else torch.float32
    assert [h.dtype for h in out.collected.values()] == [want] * 4
