"""Helpers for the multi-process tests: a tiny real-C++ snapshot, torchrun launches."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from megacpp.data.prepare import PrepareConfig, prepare_snapshot

SEQ = 64
VOCAB = 512
TIMEOUT = 240

_SNAPSHOTS: dict[str, Path] = {}


def snapshot(tmp_path_factory) -> Path | None:
    """One small snapshot per pytest process (None: no libstdc++ headers here)."""
    if "snap" not in _SNAPSHOTS:
        headers = sorted(Path("/usr/include/c++").glob("*/bits/*.h"))[:120]
        if not headers:
            return None
        root = tmp_path_factory.mktemp("dist_snap")
        src = root / "src"
        src.mkdir()
        for h in headers:
            shutil.copy(h, src / h.name)
        cfg = PrepareConfig(vocab_size=VOCAB, seq_len=SEQ, max_bytes=1 << 20, split=(0.8, 0.1, 0.1))
        prepare_snapshot(root / "snap", [f"dir:{src}"], cfg)
        _SNAPSHOTS["snap"] = root / "snap"
    return _SNAPSHOTS["snap"]


def tiny_sets(**extra) -> list[str]:
    """nam-tiny at test size, fp32, made exactly comparable across layouts.

    STP and the MoE balance / z losses are per-micro-batch means, so their
    value depends on how the global batch is split over ranks and
    micro-batches: they are off here (weights 0). The MoE expert-bias update
    stays on, with a large rate, because it must see the same all-reduced
    load on every rank; routing is dropless, so each token's expert choice
    does not depend on the split either.
    """
    sets = {
        "model.vocab_size": VOCAB, "policy.seq_len": SEQ, "policy.micro_batch": 2,
        "policy.global_batch": 8, "policy.steps": 6, "policy.eval_interval": 3,
        "policy.eval_batches": 2, "policy.checkpoint_interval": 2, "policy.log_interval": 1,
        "policy.precision.compute": "fp32", "policy.schedule.warmup_steps": 2,
        "model.attention.index_topk": 16,
        "policy.aux.stp.enabled": "false", "policy.aux.moe.weight": 0,
        "policy.aux.moe.z_loss_weight": 0, "policy.aux.moe.bias_update_rate": 0.05,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    # one thread per process: two ranks share the two cores, and the
    # one-process reference runs under the same setting
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train_cmd(nproc: int, snap: Path, out: Path, sets: list[str], extra=()) -> list[str]:
    """`megacpp train` on CPU: under torchrun when nproc > 1, else one plain process."""
    if nproc > 1:
        head = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                "--master_port", str(free_port()), "-m", "megacpp"]
    else:
        head = [sys.executable, "-m", "megacpp"]
    cmd = head + ["train", "--recipe", "nam-tiny", "--data", str(snap), "--out", str(out),
                  "--device", "cpu", "--quiet"]
    for s in sets:
        cmd += ["--set", s]
    return cmd + list(extra)


def train(nproc: int, snap: Path, out: Path, sharding: str = "none", extra=(), **sets) -> subprocess.CompletedProcess:
    layout = {"policy.parallel.data": nproc, "policy.parallel.sharding": sharding}
    cmd = train_cmd(nproc, snap, out, tiny_sets(**layout, **sets), extra)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT)
    assert p.returncode == 0, f"{' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return p


def records(run: Path, kind: str = "train") -> dict[int, dict]:
    """The last record per step (steps after the resumed checkpoint are logged twice)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r
    return out


def manifest(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())
