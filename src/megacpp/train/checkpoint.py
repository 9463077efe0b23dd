"""Atomic, checksummed checkpoints with last-good fallback.

Two formats, one per run (chosen when the run first starts, kept on resume):

- "file" (one process): RUN_DIR/checkpoints/step_00000100/{model.safetensors,
  state.pt, index.json}.
- "dcp" (several processes, or a run that started with several):
  step_00000100/{.metadata, __0_0.distcp, __1_0.distcp, ..., state.pt,
  index.json}, written collectively by torch.distributed.checkpoint. Every
  rank writes its own shard of the model and optimizer (FSDP2 DTensors or,
  under DDP, one copy of each replicated tensor); the files are keyed by
  parameter name, so they load at any world size (resharded on read).
  state.pt holds rank 0's step, loader position, gates, RNG and counters.

Either way a checkpoint is written into a temporary sibling directory, every
file is flushed and fsynced, the index (sha256 per file) is written last, by
rank 0 after a barrier, and only then is the directory renamed into place; a
crash at any moment leaves either the old set or the new one, never a half
checkpoint under a final name. At resume every candidate is verified against
its index, newest first; a corrupt or partial one is skipped with a warning.
In a multi-process run the hashing is split over the ranks (each hashes every
world_size-th file) and rank 0 decides, so all ranks load the same step. The
run directory must be on a filesystem that every node sees.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

INDEX = "index.json"
FORMAT = 1
FILE, DCP = "file", "dcp"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_meta(path: Path) -> dict:
    _fsync_file(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _no_dist() -> bool:
    """No process group: DCP reads and writes in this process alone (without warning)."""
    import torch.distributed as tdist
    return not (tdist.is_available() and tdist.is_initialized())


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}"


def _seal(root: Path, tmp: Path, final: Path, index: dict, keep: int) -> None:
    """Index last, fsync, then the atomic rename into place, then prune."""
    with open(tmp / INDEX, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. final == periodic)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict, keep: int) -> Path:
    """One process: model.safetensors + state.pt."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / ckpt_name(step)
    tmp = root / f".{ckpt_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    files = {name: _file_meta(tmp / name) for name in ("model.safetensors", "state.pt")}
    _seal(root, tmp, final, {"format": FORMAT, "kind": FILE, "step": step, "files": files}, keep)
    return final


def save_sharded(root: Path, step: int, model: torch.nn.Module, optimizers: list, state: dict,
                 keep: int, dist) -> Path:
    """Collective (every rank calls it): model + optimizer through torch.distributed.checkpoint.

    `model` is the unwrapped module (FSDP2 shards it in place; DDP's inner
    module), so tensors are keyed by the same names as a one-process model.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = root / ckpt_name(step)
    tmp = root / f".{ckpt_name(step)}.tmp-dcp"  # the same name on every rank
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()
    tensors = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True), no_dist=_no_dist())
    if dist.is_main:
        torch.save(state, tmp / "state.pt")
    dist.barrier()  # every shard, .metadata and state.pt are written
    names = sorted(p.name for p in tmp.iterdir() if p.is_file())
    mine = {n: _file_meta(tmp / n) for i, n in enumerate(names) if i % dist.world_size == dist.rank}
    parts = dist.all_gather_object(mine)
    if dist.is_main:
        files = {k: v for part in parts for k, v in part.items()}
        index = {"format": FORMAT, "kind": DCP, "step": step, "world_size": dist.world_size,
                 "sharding": dist.sharding, "files": dict(sorted(files.items()))}
        _seal(root, tmp, final, index, keep)
    dist.barrier()  # no rank runs ahead (or exits) before the checkpoint is in place
    return final


def prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step_*.tmp-*"):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)


@dataclass
class Verified:
    path: Path
    step: int
    kind: str = FILE


def _read_index(path: Path) -> tuple[dict | None, str]:
    idx = path / INDEX
    if not idx.is_file():
        return None, "no index.json (partial checkpoint)"
    try:
        index = json.loads(idx.read_text())
        index["files"].items()
        index["step"]
    except (ValueError, KeyError, AttributeError) as e:
        return None, f"unreadable index.json ({e})"
    return index, "ok"


def _check_file(path: Path, name: str, meta: dict) -> str | None:
    f = path / name
    if not f.is_file():
        return f"{name} missing"
    if f.stat().st_size != meta["bytes"]:
        return f"{name} has {f.stat().st_size} bytes, index says {meta['bytes']}"
    if sha256_file(f) != meta["sha256"]:
        return f"{name} checksum mismatch"
    return None


def verify(path: Path, dist=None) -> tuple[bool, str]:
    """Every file against the index. With `dist`, collective: rank 0 reads the
    index, each rank hashes its share of the files, all ranks get one answer."""
    index, why = _read_index(path) if dist is None or dist.is_main else (None, "")
    if dist is not None:
        index, why = dist.broadcast_object((index, why))
    if index is None:
        return False, why
    names = sorted(index["files"])
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    problem = None
    for name in names[rank::world]:
        problem = _check_file(path, name, index["files"][name])
        if problem:
            break
    problems = dist.all_gather_object(problem) if dist is not None else [problem]
    problems = [p for p in problems if p]
    return (False, problems[0]) if problems else (True, "ok")


def latest_good(root: Path, dist=None) -> tuple[Verified | None, list[str]]:
    """Newest checkpoint that verifies, plus warnings about the ones skipped."""
    warnings = []
    found = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True) \
        if dist is None or dist.is_main else None
    if dist is not None:
        found = dist.broadcast_object(found)
    for path in found:
        ok, why = verify(path, dist)
        if ok:
            index = json.loads((path / INDEX).read_text())
            return Verified(path, index["step"], index.get("kind", FILE)), warnings
        warnings.append(f"checkpoint {path} skipped: {why}")
    return None, warnings


def read_state(v: Verified) -> dict:
    """The non-tensor run state (rank 0's): step, loader, gates, RNG, counters, recipe hash."""
    return torch.load(v.path / "state.pt", map_location="cpu", weights_only=False)


def load_weights(v: Verified, model: torch.nn.Module) -> None:
    """Model weights of either format into `model` (plain, or sharded in place by FSDP2)."""
    if v.kind == FILE:
        load_model(model, str(v.path / "model.safetensors"), strict=True)
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    msd = get_model_state_dict(model)
    dcp.load({"model": msd}, storage_reader=dcp.FileSystemReader(str(v.path)), no_dist=_no_dist())
    set_model_state_dict(model, msd)


def load_checkpoint(v: Verified, model: torch.nn.Module) -> dict:
    """Weights into `model`; returns the run state (eval, generate, one-process resume)."""
    load_weights(v, model)
    return read_state(v)


def load_sharded(v: Verified, model: torch.nn.Module, optimizers: list) -> None:
    """A "dcp" checkpoint's model and optimizer, resharded to this run's layout.

    Collective when a process group is up; works in one process too.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    # templates: the optimizer one is keyed by parameter name (its state is
    # created by a zero-lr step first, so every entry has a tensor to load into)
    tensors = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
    dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(v.path)), no_dist=_no_dist())
    set_model_state_dict(model, tensors["model"])
    set_optimizer_state_dict(model, optimizers, tensors["optim"])
