"""Atomic, checksummed checkpoints with last-good fallback.

Layout: RUN_DIR/checkpoints/step_00000100/{model.safetensors, state.pt,
index.json}. A checkpoint is written into a temporary sibling directory,
every file is flushed and fsynced, the index (sha256 per file) is written
last, and only then is the directory renamed into place; a crash at any
moment leaves either the old set or the new one, never a half checkpoint
under a final name. At resume every candidate is verified against its index,
newest first; a corrupt or partial one is skipped with a warning.
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


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(root: Path, step: int, model: torch.nn.Module, state: dict, keep: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / ckpt_name(step)
    tmp = root / f".{ckpt_name(step)}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    files = {}
    for name in ("model.safetensors", "state.pt"):
        _fsync_file(tmp / name)
        files[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
    index = {"format": FORMAT, "step": step, "files": files}
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


def verify(path: Path) -> tuple[bool, str]:
    idx = path / INDEX
    if not idx.is_file():
        return False, "no index.json (partial checkpoint)"
    try:
        index = json.loads(idx.read_text())
        files = index["files"]
    except (ValueError, KeyError) as e:
        return False, f"unreadable index.json ({e})"
    for name, meta in files.items():
        f = path / name
        if not f.is_file():
            return False, f"{name} missing"
        if f.stat().st_size != meta["bytes"]:
            return False, f"{name} has {f.stat().st_size} bytes, index says {meta['bytes']}"
        if sha256_file(f) != meta["sha256"]:
            return False, f"{name} checksum mismatch"
    return True, "ok"


def latest_good(root: Path) -> tuple[Verified | None, list[str]]:
    """Newest checkpoint that verifies, plus warnings about the ones skipped."""
    warnings = []
    for path in sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True):
        ok, why = verify(path)
        if ok:
            step = json.loads((path / INDEX).read_text())["step"]
            return Verified(path, step), warnings
        warnings.append(f"checkpoint {path} skipped: {why}")
    return None, warnings


def load_checkpoint(v: Verified, model: torch.nn.Module) -> dict:
    missing, unexpected = load_model(model, str(v.path / "model.safetensors"), strict=True)
    return torch.load(v.path / "state.pt", map_location="cpu", weights_only=False)
