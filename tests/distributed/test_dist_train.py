"""`megacpp train` under torchrun on CPU (gloo): DDP and FSDP2 follow the one-process
trajectory, sharded checkpoints resume at another world size, a corrupt shard falls back.

Every run is a subprocess (`python -m torch.distributed.run --nproc_per_node 2 -m megacpp
train ... --device cpu`); the global batch (8 rows) is the same in all of them, split as
1 x 4 micro-batches of 2 or 2 ranks x 2 micro-batches of 2 (so gradient accumulation and
its skipped synchronisation run too). See dist_testutil.tiny_sets for what is switched off.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_testutil import TIMEOUT, env, free_port, manifest, records, snapshot, tiny_sets, train, train_cmd

STEPS = 6
# fp32 sums taken in another order differ by ~1e-7 at step 0; Adam's first
# steps amplify that about tenfold per step in the gradient norm, while the
# losses stay within ~1e-6. A real fault (an unsynchronised gradient, a
# rank-local MoE load, a wrong loss scale) moves both by 1e-3 or more.
REL = {"loss": 1e-5, "grad_norm": 1e-4}


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    s = snapshot(tmp_path_factory)
    if s is None:
        pytest.skip("no libstdc++ headers on this machine")
    return s


@pytest.fixture(scope="module")
def one_process(snap, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    train(1, snap, out)
    return out


@pytest.fixture(scope="module")
def fsdp2_run(snap, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    train(2, snap, out, "fsdp2")
    return out


@pytest.fixture(scope="module")
def interrupted(snap, tmp_path_factory) -> Path:
    """FSDP2 on 2 ranks stopped after step 4 (checkpoints at 2 and 4, no final save)."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    train(2, snap, out, "fsdp2", extra=["--max-steps", "4"])
    return out


def assert_same(got: dict[int, dict], want: dict[int, dict], steps, keys=("loss", "grad_norm")):
    assert sorted(got) == sorted(steps), (sorted(got), steps)
    for s in steps:
        for k in keys:
            a, b = got[s][k], want[s][k]
            assert math.isclose(a, b, rel_tol=REL[k], abs_tol=0.0), (s, k, a, b)


def test_ddp_matches_one_process(snap, one_process, tmp_path):
    out = tmp_path / "ddp"
    train(2, snap, out, "ddp")
    assert_same(records(out), records(one_process), range(STEPS))
    assert_same(records(out, "val"), records(one_process, "val"), [0, 3, 6], keys=("loss",))
    layout = manifest(out)["backend"]["layout"]
    assert layout["world_size"] == 2 and layout["data_parallel"] == 2 and layout["sharding"] == "ddp"


def test_fsdp2_matches_one_process(fsdp2_run, one_process):
    assert_same(records(fsdp2_run), records(one_process), range(STEPS))
    # eval takes the same rows at any world size
    assert_same(records(fsdp2_run, "val"), records(one_process, "val"), [0, 3, 6], keys=("loss",))
    m = manifest(fsdp2_run)
    b, layout = m["backend"], m["backend"]["layout"]
    assert b["world_size"] == 2 and b["grad_accumulation"] == 2
    assert layout["world_size"] == 2 and layout["data_parallel"] == 2 and layout["sharding"] == "fsdp2"
    assert layout["backend"] == "gloo" and layout["nccl"] is None and layout["launcher"] == "torchrun"
    assert layout["nodes"] == 1 and layout["processes_per_node"] == 2
    assert layout["checkpoint_format"] == "dcp"
    assert layout["fsdp2_mixed_precision"]["param_dtype"] == "float32"
    assert layout["fsdp2_mixed_precision"]["reduce_dtype"] == "float32"
    assert m["outcome"]["status"] == "finished" and m["outcome"]["tokens"] == STEPS * 8 * 64
    one = manifest(one_process)["backend"]["layout"]
    assert one["world_size"] == 1 and one["checkpoint_format"] == "file"


def test_sharded_checkpoint_resumes_at_world_size_one(snap, interrupted, fsdp2_run, tmp_path):
    ckpt = interrupted / "checkpoints" / "step_00000004"
    shards = sorted(p.name for p in ckpt.glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    train(1, snap, out, extra=["--resume"])
    assert_same(records(out), records(fsdp2_run), range(STEPS))
    m = manifest(out)
    warnings = " ".join(m["outcome"]["warnings"])
    assert "resumed under another layout: world size 2 (fsdp2" in warnings
    assert "resumed from step_00000004 (step 4)" in warnings
    assert m["outcome"]["steps"] == STEPS and m["outcome"]["tokens"] == STEPS * 8 * 64
    # one format per run: the one-process continuation still writes sharded checkpoints
    assert m["backend"]["layout"]["checkpoint_format"] == "dcp"
    assert (out / "checkpoints" / "step_00000006" / ".metadata").is_file()
    # and a one-process reader (eval) opens them
    ev = subprocess.run([sys.executable, "-m", "megacpp", "eval", str(out), "--batches", "2", "--json"],
                        capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr
    assert '"bpb"' in ev.stdout


def test_corrupt_shard_falls_back_to_previous(snap, interrupted, fsdp2_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    shard = out / "checkpoints" / "step_00000004" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    train(2, snap, out, "fsdp2", extra=["--resume"])
    warnings = " ".join(manifest(out)["outcome"]["warnings"])
    assert "step_00000004 skipped: __1_0.distcp checksum mismatch" in warnings
    assert "resumed from step_00000002 (step 2)" in warnings
    # steps 2-5 re-run from the step-2 checkpoint reproduce the uninterrupted run
    assert_same(records(out), records(fsdp2_run), range(STEPS))


def test_one_process_checkpoint_is_refused_by_two(snap, one_process, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_process, out)
    cmd = train_cmd(2, snap, out, tiny_sets(**{"policy.parallel.data": 2, "policy.parallel.sharding": "fsdp2"}),
                    ["--resume"])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert p.returncode != 0
    # the ranks fail with the CLI's one-line error (exit 2), not a traceback of their own
    assert "megacpp: error: " in p.stderr and "written by one process (model.safetensors)" in p.stderr
    assert "exitcode  : 2" in p.stderr


def test_sigterm_stops_every_rank_at_one_step_and_saves(snap, tmp_path):
    out = tmp_path / "run"
    sets = tiny_sets(**{"policy.parallel.data": 2, "policy.parallel.sharding": "ddp", "policy.steps": 400,
                        "policy.checkpoint_interval": 1000, "policy.eval_batches": 0})
    proc = subprocess.Popen(train_cmd(2, snap, out, sets), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and records(out):
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it to both ranks
    _, err = proc.communicate(timeout=TIMEOUT)
    m = manifest(out)
    assert m["outcome"]["end_reason"] == "signal:SIGTERM", err[-3000:]
    step = m["outcome"]["steps"]
    assert 0 < step < 400
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    assert json.loads((ckpt / "index.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


BF16 = {"policy.precision.compute": "bf16", "policy.patches.linear_ce": "off",
        "policy.steps": 3, "policy.eval_batches": 0}


@pytest.fixture(scope="module")
def one_bf16(snap, tmp_path_factory) -> Path:
    """One process, bf16 autocast over float32 weights, 3 steps."""
    out = tmp_path_factory.mktemp("one_bf16") / "run"
    train(1, snap, out, **BF16)
    return out


def assert_follows_bf16(got: dict[int, dict], want: dict[int, dict]):
    # step 0's forward is the same arithmetic split over ranks (a gather that
    # rounded anything autocast does not, e.g. the residual stream, moves it ~1e-5)
    assert math.isclose(got[0]["loss"], want[0]["loss"], rel_tol=1e-6), (got[0]["loss"], want[0]["loss"])
    for s in range(3):
        # bf16 matmuls summed over another split of the batch: ~1e-3 apart; an
        # unreduced or mis-cast gradient would be 1e-2 or more off by step 2
        assert math.isclose(got[s]["loss"], want[s]["loss"], rel_tol=2e-3), (s, got[s]["loss"], want[s]["loss"])


@pytest.mark.parametrize("gather", ["storage", "compute", "compute_subgroups"])
def test_fsdp2_bf16_compute_follows_one_process(snap, one_bf16, tmp_path, gather):
    """bf16 autocast over float32 weights. By default each layer is one float32
    group (the compiled graphs of one process); with policy.parallel.gather
    "compute" the layers' GEMM weights travel as bf16 (autocast would round
    them to bf16 anyway) and the rest is replicated; "compute_subgroups"
    gathers the rest in float32. Every way the run follows the one-process
    bf16 run."""
    two = tmp_path / "two"
    train(2, snap, two, "fsdp2", **BF16, **{"policy.parallel.gather": gather})
    mp = manifest(two)["backend"]["layout"]["fsdp2_mixed_precision"]
    assert mp["param_dtype"] == "float32" and mp["gather"] == gather
    if gather == "storage":
        assert mp["gemm_param_dtype"] is None and mp["gemm_groups"] == 0 and mp["replicated_params"] == 0
    else:
        assert mp["gemm_param_dtype"] == "bfloat16"
        assert mp["gemm_groups"] == 12 and mp["gemm_params"] > 0  # every nam-tiny layer has GEMMs
        # the norms, SSM scalars, routers and convs: replicated only when gathering "compute"
        assert (mp["replicated_params"] > 0) == (gather == "compute")
    assert manifest(two)["backend"]["layout"]["grad_reduce_dtype"] == "float32"
    assert_follows_bf16(records(two), records(one_bf16))


@pytest.mark.parametrize("sharding", ["ddp", "fsdp2"])
def test_bf16_gradient_reduce_follows_one_process(snap, one_bf16, tmp_path, sharding):
    """policy.parallel.reduce = "compute": gradients averaged over the ranks in
    bf16 (FSDP2's reduce dtype; DDP's bf16 compression hook), recorded in the
    manifest, and the run still follows the one-process bf16 run."""
    out = tmp_path / "run"
    train(2, snap, out, sharding, **BF16, **{"policy.parallel.reduce": "compute"})
    layout = manifest(out)["backend"]["layout"]
    assert layout["grad_reduce_dtype"] == "bfloat16"
    if sharding == "fsdp2":
        assert layout["fsdp2_mixed_precision"]["reduce_dtype"] == "bfloat16"
    assert_follows_bf16(records(out), records(one_bf16))


def test_fsdp2_grouped_layers_without_reshard_match_one_process(snap, one_process, tmp_path):
    """Five layers to a group (12 layers: groups of 5, 5, 2) and the gathered
    weights kept from forward to backward: the same fp32 trajectory."""
    out = tmp_path / "grouped"
    train(2, snap, out, "fsdp2", **{"policy.parallel.group_layers": 5,
                                    "policy.parallel.reshard_after_forward": "false"})
    assert_same(records(out), records(one_process), range(STEPS))
    mp = manifest(out)["backend"]["layout"]["fsdp2_mixed_precision"]
    assert mp["groups"] == 4 and mp["layers_per_group"] == 5 and mp["reshard_after_forward"] is False


def test_two_node_rendezvous_matches_one_process(snap, one_process, tmp_path):
    """The README's multi-node launch: two torchrun agents (`--nnodes 2
    --nproc_per_node 1`, c10d rendezvous), here both on this host and
    writing to one --out as nodes on a shared filesystem would. FSDP2 over
    the two "nodes" follows the one-process trajectory, and the manifest
    records 2 nodes of 1 process."""
    out = tmp_path / "two-nodes"
    port = free_port()
    sets = tiny_sets(**{"policy.parallel.data": 2, "policy.parallel.sharding": "fsdp2"})
    cmd = train_cmd(1, snap, out, sets)
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "two-nodes",
             "-m", "megacpp"] + cmd[3:]
    procs = [subprocess.Popen(agent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env())
             for _ in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
    assert_same(records(out), records(one_process), range(STEPS))
    layout = manifest(out)["backend"]["layout"]
    assert layout["nodes"] == 2 and layout["processes_per_node"] == 1 and layout["world_size"] == 2
    assert layout["launcher"] == "torchrun"
