"""Loss and bits per byte of a model on a split of its data snapshot."""
from __future__ import annotations

import math

import torch

from ..data.loader import PackedLoader, open_snapshot
from ..train.trainer import IGNORE, bits_per_byte, lm_loss


@torch.no_grad()
def evaluate_split(run, split: str, batches: int, device: torch.device) -> dict:
    snap = open_snapshot(run.data_dir)
    pol = run.recipe.policy
    loader = PackedLoader(snap, split, pol.micro_batch, seed=0, epochs=1, prefetch=1)
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if batches and i >= batches:
                break
            batch = {k: v.to(device) for k, v in batch.items()}
            out = run.model(batch["input_ids"], doc_ids=batch["doc_ids"], positions=batch["positions"])
            loss = lm_loss(run.model, out.hidden, batch["labels"]).float()
            n = int((batch["labels"] != IGNORE).sum())
            total += float(loss) * n
            count += n
    finally:
        loader.close()
    mean = total / max(count, 1)
    return {"run": str(run.run_dir), "step": run.step, "split": split, "loss": mean,
            "bpb": bits_per_byte(mean, snap, split), "tokens": count,
            "perplexity": math.exp(min(mean, 50))}
