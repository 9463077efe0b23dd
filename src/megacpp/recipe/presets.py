"""Built-in recipes. Each is a partial tree over the blank defaults.

nam56r holds the public constants of the seed system's NAM56R recipe
(cppmega `recipes/nam56r_nemo_recipe.py`, see shared/FACTS.md §1). The
smaller presets keep its pattern at sizes that train here.
"""
from __future__ import annotations

import copy

from .io import deep_merge

_NAM_PATTERN = "AEMEAEMEAEMR"

NAM56R = {
    "model": {
        "name": "nam56r",
        "vocab_size": 65536,
        "hidden_size": 3584,
        "depth": 52,
        "pattern": _NAM_PATTERN,
        "ffn_size": 18944,
        "activation": "swiglu",
        "attention": {
            "kind": "mla", "num_heads": 56, "num_kv_heads": 8, "head_dim": 64,
            "rope_theta": 500000.0,
            "q_lora_rank": 64, "kv_lora_rank": 64, "qk_head_dim": 64, "qk_rope_dim": 64,
            "v_head_dim": 64,
            "index_heads": 8, "index_head_dim": 64, "index_topk": 256,
        },
        "mamba": {"version": 3, "state_dim": 64, "head_dim": 64, "expand": 2, "num_groups": 8,
                  "chunk_size": 128},
        "moe": {"num_experts": 16, "top_k": 4, "expert_ffn": 896, "shared_ffn": 1024,
                "score": "sigmoid", "bias_balancing": True},
        "recurrent": {"kind": "gated_deltanet", "num_heads": 28, "key_dim": 128, "value_dim": 128},
    },
    "policy": {
        "seq_len": 4096, "micro_batch": 4, "global_batch": 64, "steps": 100000,
        "optimizer": {"lr": 3e-4},
        "schedule": {"kind": "cosine", "warmup_steps": 2000},
        "precision": {"compute": "bf16"},
        "parallel": {"data": 8, "sharding": "fsdp2"},
        "aux": {
            "stp": {"enabled": True, "weight": 0.05, "start_step": 10000, "n_spans": 4,
                    "layers": "final"},
            "moe": {"weight": 1e-4},
        },
        "checkpoint_interval": 1000, "eval_interval": 1000,
    },
}

NAM_TINY = {
    "model": {
        "name": "nam-tiny",
        "vocab_size": 4096,
        "hidden_size": 128,
        "depth": 12,
        "pattern": _NAM_PATTERN,
        "ffn_size": 512,
        "attention": {
            "kind": "mla", "num_heads": 4, "rope_theta": 10000.0,
            "q_lora_rank": 0, "kv_lora_rank": 32, "qk_head_dim": 32, "qk_rope_dim": 16,
            "v_head_dim": 32, "index_heads": 2, "index_head_dim": 32, "index_topk": 64,
        },
        "mamba": {"version": 3, "state_dim": 16, "head_dim": 32, "expand": 2, "num_groups": 1,
                  "chunk_size": 64},
        "moe": {"num_experts": 8, "top_k": 2, "expert_ffn": 128, "shared_ffn": 128,
                "score": "sigmoid", "bias_balancing": True},
        "recurrent": {"kind": "gated_deltanet", "num_heads": 4, "key_dim": 32, "value_dim": 32},
    },
    "policy": {
        "seq_len": 256, "micro_batch": 8, "global_batch": 16, "steps": 300,
        "optimizer": {"lr": 3e-3, "weight_decay": 0.0},
        "schedule": {"kind": "cosine", "warmup_steps": 30},
        "precision": {"compute": "fp32"},
        "aux": {"stp": {"enabled": True, "weight": 0.05, "start_step": 100, "n_spans": 4}},
        "eval_interval": 50, "eval_batches": 4, "checkpoint_interval": 100, "log_interval": 10,
    },
}

_SMALL_GPU_POLICY = {
    "seq_len": 2048, "micro_batch": 16, "global_batch": 32, "steps": 5000,
    "optimizer": {"lr": 1e-3},
    "schedule": {"kind": "cosine", "warmup_steps": 200},
    "precision": {"compute": "bf16"},
    "compile": {"mode": "default"},
    # under FSDP2, keep the gathered weights from forward to backward: one
    # all-gather per step instead of two (nam-1b, 2x H200: 0.82 -> 0.90 of
    # one GPU's tokens/s per GPU); at these sizes the memory is there
    "parallel": {"reshard_after_forward": False},
    "eval_interval": 250, "checkpoint_interval": 1000,
}

NAM_125M = {
    "model": {
        "name": "nam-125m",
        "vocab_size": 32768,
        "hidden_size": 768,
        "depth": 24,
        "pattern": _NAM_PATTERN,
        "ffn_size": 2048,
        "attention": {"kind": "gqa", "num_heads": 12, "num_kv_heads": 4, "rope_theta": 10000.0,
                      "index_heads": 4, "index_head_dim": 64, "index_topk": 256},
        "mamba": {"version": 2, "state_dim": 128, "head_dim": 64, "expand": 2, "num_groups": 1,
                  "chunk_size": 128},
        "moe": {"num_experts": 8, "top_k": 2, "expert_ffn": 768, "shared_ffn": 0,
                "score": "sigmoid", "bias_balancing": True},
        "recurrent": {"kind": "gated_deltanet", "num_heads": 6, "key_dim": 128, "value_dim": 128},
    },
    # compile "auto": CUDA graphs on one GPU (its step is host-bound in part), the
    # default mode under DDP/FSDP2. On an H200 (2026-11-28) 40 training steps on C++
    # gave the default mode's losses exactly at 320,573 tokens/s against 248,575.
    # SSD chunk states kept: at the recipe's step (two micro-batches, H200,
    # thirteenth session) 369,344 -> 376,575 tokens/s for 16.20 -> 16.91 GiB,
    # below the HF Llama peer's 19.3 (BENCHMARKS.md). Fourteenth session, same
    # step: one graph for the model (scope "auto": "model" on one GPU, per layer
    # under DDP/FSDP2) 381,999 -> 391,078, the delta rule's intermediates kept
    # -> 388,042; both 399,877 tokens/s at 19.09 GiB (the peer in that run:
    # 396,452 at 19.27); 30 training steps on C++ within 1.5e-4 of the old preset;
    # this preset in a later call 395,341 against the peer's 391,036 (1.01x).
    # Eighteenth session (one H200, three alternating pairs): the experts' weight
    # gradient in 4 parts + the Triton SwiGLU (now its "auto") 402,807 -> 410,876
    # tokens/s (+2.0%), every pair the same way, peak unchanged.
    # Twentieth session (one H200, two alternating rounds): the residual stream in
    # bf16 + Mamba's in_proj as three GEMMs 410,040 -> 424,295 tokens/s (+3.5%),
    # peak 19.09 -> 17.39 GiB; 300 training steps on C++ beside the float32
    # stream: val bits/byte 1.3480 against 1.3515, mean |loss gap| 1.8e-2 after
    # step 100 (BENCHMARKS.md).
    # Twenty-second session (one H200): the MoE's gates in the experts'
    # activation, two alternating pairs 425,690 -> 427,061 tokens/s (+0.3%),
    # peak 17.39 -> 16.46 GiB; 30 training steps on C++ within 2.3e-4 of the
    # old preset's losses, at 420,798 tokens/s against 414,997.
    "policy": deep_merge(_SMALL_GPU_POLICY, {"compile": {"mode": "auto", "scope": "auto"},
                                             "precision": {"residual": "compute"},
                                             "kernels": {"ssd_states": "keep", "delta_states": "keep",
                                                         "moe_wgrad_splits": 4, "mamba_in_proj": "split",
                                                         "moe_gate": "activation"}}),
}

DENSE_125M = {
    "model": {
        "name": "dense-125m",
        "vocab_size": 32768,
        "hidden_size": 768,
        "depth": 24,
        "pattern": "AF",
        "ffn_size": 2048,
        "attention": {"kind": "gqa", "num_heads": 12, "num_kv_heads": 4, "rope_theta": 10000.0},
    },
    "policy": copy.deepcopy(_SMALL_GPU_POLICY),
}

NAM_1B = {
    "model": {
        "name": "nam-1b",
        "vocab_size": 32768,
        "hidden_size": 2048,
        "depth": 24,
        "pattern": _NAM_PATTERN,
        "ffn_size": 5632,
        "attention": {"kind": "gqa", "num_heads": 16, "num_kv_heads": 4, "rope_theta": 10000.0,
                      "index_heads": 4, "index_head_dim": 64, "index_topk": 256},
        "mamba": {"version": 2, "state_dim": 128, "head_dim": 64, "expand": 2, "num_groups": 1,
                  "chunk_size": 128},
        "moe": {"num_experts": 8, "top_k": 2, "expert_ffn": 1408, "shared_ffn": 0,
                "score": "sigmoid", "bias_balancing": True},
        "recurrent": {"kind": "gated_deltanet", "num_heads": 16, "key_dim": 128, "value_dim": 128},
    },
    # micro batch 16: twice the compute per byte FSDP2 moves. On 4x H200
    # (2026-11-28, BENCHMARKS.md): 0.77 of one GPU's tokens/s per GPU at micro
    # batch 8, 0.93 at 16 (one GPU: 30.5% -> 34.0% MFU); 49 GiB on one GPU.
    # Global 64 = 16 x 4 GPUs, or 4 micro-batches on one. The SSD's chunk states
    # and the delta rule's intermediates kept, one graph for the model on one GPU:
    # at micro batch 32 on an H200 (fourteenth session) 39.4% -> 41.1% -> 41.7% MFU
    # (peak 93 GiB; `--set policy.micro_batch=32` on one card of 141 GiB); this
    # preset at micro batch 16: 38.6% -> 40.6%, 55.6 GiB.
    "policy": deep_merge(_SMALL_GPU_POLICY, {"micro_batch": 16, "global_batch": 64,
                                             "optimizer": {"lr": 5e-4},
                                             "compile": {"scope": "auto"},
                                             "kernels": {"ssd_states": "keep", "delta_states": "keep"}}),
}

# nam-1b's model with FP8 GEMMs: the dense ones tensorwise (torchao), the experts'
# grouped ones rowwise (ops.fp8_grouped), at micro batch 32 (two micro-batches of
# the global 64 on one card; 85 GiB: a 141 GB H200, `--set policy.micro_batch=16`
# on an 80 GB card). On H200s (seventeenth session, BENCHMARKS.md) these
# settings ran at 45.0-46.5% MFU in 13 runs on at least four cards (this preset:
# 45.8%, 45.0%; 45.6% twice in the nineteenth), and 44.3-44.7% on a card held at
# 0.85 of boost by its power cap (eighteenth), against the bf16 preset's 41.3% at micro 16; 300 training steps
# on C++ within 6.2e-2 of bf16's losses, val bits/byte 1.014 against 1.018.
# The model spec is nam-1b's: precision is run policy, not the model's identity.
NAM_1B_FP8 = deep_merge(NAM_1B, {"policy": {
    "micro_batch": 32,
    "precision": {"low_precision": "fp8_tensorwise", "expert_low_precision": "fp8_rowwise"}}})

# mamba_ssm's Mamba-2 LM shape (state-spaces/mamba2-130m: every layer Mamba-2,
# no MLP, tied embeddings) at this project's vocabulary; the peer benchmark
# (benchmarks/mamba_ssm_peer.py) builds mamba_ssm's model at the same shape,
# batch 8 x 2048 as in shared/FACTS.md §3.
MAMBA2_130M = {
    "model": {
        "name": "mamba2-130m",
        "vocab_size": 32768,
        "hidden_size": 768,
        "depth": 24,
        "pattern": "M",
        "tie_embeddings": True,
        "mamba": {"version": 2, "state_dim": 128, "head_dim": 64, "expand": 2, "num_groups": 1,
                  "chunk_size": 128},
    },
    # CUDA graphs (inductor's cudagraph trees): 24 small Mamba layers leave the
    # GPU waiting on the host (51% busy in a default-mode profile). On an H200
    # (2026-11-28): 90.2 vs 110.5 ms a step in `megacpp bench`, and 40 training
    # steps on real data 184k vs 167k tokens/s with losses within 2.4e-4 of the
    # default mode's. One graph for the whole model (scope "model") rather than
    # one per layer: 40 training steps 219k vs 203k tokens/s, losses within
    # 1.2e-4 (ninth session; BENCHMARKS.md). On CPU inductor skips the graphs.
    # The SSD's chunk states kept for the backward: 73.8 -> 68.9 ms a step on an
    # H200, peak 9.9 -> 12.3 GiB (mamba_ssm's peer: 16.7).
    "policy": deep_merge(_SMALL_GPU_POLICY, {"micro_batch": 8, "global_batch": 8,
                                             "compile": {"mode": "reduce-overhead", "scope": "model"},
                                             "kernels": {"ssd_states": "keep"}}),
}

PRESETS = {
    "nam56r": (NAM56R, "NAM56R, the seed system's public 4.7B hybrid (MLA, Mamba-3, MoE 16x top-4); "
                       "describe/args only here"),
    "nam-tiny": (NAM_TINY, "NAM56R's pattern at a few million parameters; trains on a CPU in minutes"),
    "nam-125m": (NAM_125M, "NAM pattern, ~125M active parameters (GQA, Mamba-2, MoE 8x top-2); one GPU"),
    "nam-1b": (NAM_1B, "NAM pattern, ~1B parameters; one GPU"),
    "nam-1b-fp8": (NAM_1B_FP8, "nam-1b with FP8 GEMMs (dense tensorwise, experts rowwise) at micro batch 32: "
                               "one FP8 GPU of 141 GB (H200)"),
    "dense-125m": (DENSE_125M, "AF attention + dense SwiGLU baseline matched to nam-125m's active "
                               "parameters"),
    "mamba2-130m": (MAMBA2_130M, "all-Mamba-2 LM at mamba_ssm's mamba2-130m shape (24 x d768, state 128, "
                                 "tied embeddings); peer of benchmarks/mamba_ssm_peer.py"),
}


def preset_tree(name: str) -> dict:
    return copy.deepcopy(PRESETS[name][0])


def describe_presets() -> list[tuple[str, str]]:
    return [(name, desc) for name, (_, desc) in PRESETS.items()]
