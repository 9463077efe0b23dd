"""Recipe overrides for the trainer tests (imported by name: a module called
`conftest` would collide with the other test folders' conftest modules)."""
from __future__ import annotations

SEQ = 64
VOCAB = 512


def tiny_sets(**extra) -> list[str]:
    sets = {
        "model.vocab_size": VOCAB, "policy.seq_len": SEQ, "policy.micro_batch": 4,
        "policy.global_batch": 8, "policy.steps": 6, "policy.eval_interval": 3,
        "policy.eval_batches": 2, "policy.checkpoint_interval": 2, "policy.log_interval": 1,
        "policy.precision.compute": "fp32", "policy.schedule.warmup_steps": 2,
        "policy.aux.stp.start_step": 2, "model.attention.index_topk": 16,
    }
    sets.update(extra)
    return [f"{k}={v}" for k, v in sets.items()]
