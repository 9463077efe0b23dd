"""Open a finished (or checkpointed) run: its recipe, weights and data snapshot."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MegacppError
from ..recipe import Recipe, load_recipe
from ..run.manifest import read_manifest
from ..train.checkpoint import latest_good, load_checkpoint


@dataclass
class LoadedRun:
    run_dir: Path
    recipe: Recipe
    model: torch.nn.Module
    manifest: dict
    step: int
    data_dir: Path


def load_run(run_dir, device: torch.device, data_dir=None) -> LoadedRun:
    import megacpp

    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    recipe = load_recipe(str(run_dir / "recipe.toml"))
    if recipe.hash != manifest["spec"]["recipe_hash"]:
        raise MegacppError(f"{run_dir / 'recipe.toml'}: does not match run.json's recipe hash")
    v, warnings = latest_good(run_dir / "checkpoints")
    if v is None:
        raise MegacppError(f"{run_dir / 'checkpoints'}: no valid checkpoint"
                           + (f" ({'; '.join(warnings)})" if warnings else ""))
    model = megacpp.build_model(recipe.model)
    load_checkpoint(v, model)
    model.to(device).eval()
    data = Path(data_dir or manifest["backend"]["data"]["path"])
    return LoadedRun(run_dir, recipe, model, manifest, v.step, data)
