"""Sampling with the incremental decoder (prefill once, then one token a step)."""
from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, prompt_ids: list[int], max_tokens: int, temperature: float = 0.8,
           top_k: int = 50, eos_id: int | None = None, seed: int = 0,
           device: torch.device | None = None) -> list[int]:
    device = device or next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits, cache = model.prefill(ids)
    out: list[int] = []
    for _ in range(max_tokens):
        logits = logits.float().reshape(-1)
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k and top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1).cpu()
            nxt = int(torch.multinomial(probs, 1, generator=g))
        if eos_id is not None and nxt == eos_id:
            break
        out.append(nxt)
        logits = model.step(torch.tensor([[nxt]], dtype=torch.long, device=device), cache)
    return out
