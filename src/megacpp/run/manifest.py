"""The run manifest, RUN_DIR/run.json: what exactly this run was.

Sections, answering the seed's four questions plus the backend contract:
  spec        the resolved recipe and its hash
  pattern     per-layer letters, families, variants, norm seams, parameters
  patches     each memory patch: what it replaced, backend, version, parity, or why not
  aux_losses  each auxiliary loss: configuration, gate, first-active step
  backend     device, versions, precision, compile, activation checkpointing,
              world size and layout, seed, data snapshot, tokenizer, megacpp + git commit
  outcome     steps, tokens, final losses and bits per byte, wall time, peak
              memory, why the run ended, warnings
Written atomically (temp file + rename) at start and at every checkpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import megacpp
from ..recipe import Recipe
from ..recipe.count import layer_rows, summarize

MANIFEST = "run.json"
FORMAT = 1


def git_commit() -> dict:
    here = Path(megacpp.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
        return {"commit": commit or None, "dirty": dirty if commit else None}
    except Exception:
        return {"commit": None, "dirty": None}


def spec_section(recipe: Recipe) -> dict:
    return {"recipe_name": recipe.model.name, "recipe_hash": recipe.hash, "source": recipe.source,
            "recipe": recipe.to_dict()}


def pattern_section(recipe: Recipe) -> dict:
    rows = layer_rows(recipe)
    s = summarize(recipe, rows)
    return {"pattern": recipe.model.pattern, "depth": recipe.model.depth,
            "resolved": recipe.layers.with_stages(),
            "counts": {k: v for k, v in recipe.layers.counts().items() if v},
            "overrides": {str(k): v for k, v in sorted(recipe.model.overrides.items())},
            "layers": [{"index": r.index, "letter": r.letter, "family": r.family, "variant": r.variant,
                        "norm_seam": r.norm_seam, "params": r.params, "active_params": r.active_params}
                       for r in rows],
            "total_params": s.total_params, "active_params": s.active_params,
            "flops_per_token": s.flops_per_token}


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(run_dir: str | Path) -> dict:
    from ..errors import MegacppError

    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        raise MegacppError(f"{path}: no run manifest (is {run_dir} a run directory?)")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise MegacppError(f"{path}: unreadable run manifest ({e})") from None


def new_manifest(recipe: Recipe) -> dict:
    return {"format": FORMAT, "megacpp_version": megacpp.__version__,
            "spec": spec_section(recipe), "pattern": pattern_section(recipe),
            "patches": [], "aux_losses": {}, "backend": {}, "outcome": {"status": "starting"}}
