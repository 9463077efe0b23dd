"""ModelSpec: everything that defines the network's identity.

A frozen dataclass tree. Every field is printed by the manifest and hashed
into the recipe id, so no behaviour hides in a default. Sentinels instead of
None (TOML has no null): 0 means "not used" / "derive" where documented.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class NormSpec:
    kind: str = "rmsnorm"            # rmsnorm | layernorm
    eps: float = 1e-5
    # The explicit pre-norm seam of each family: "pre" puts a norm in front of
    # the sublayer (x + f(norm(x))); "none" feeds the residual stream raw.
    # Mamba-3 has no input norm of its own, so "none" is refused for it
    # (the seed system saw NaN gradients from step one without it).
    seams: dict[str, str] = field(default_factory=lambda: {
        "A": "pre", "M": "pre", "R": "pre", "E": "pre", "F": "pre"})


@dataclass(frozen=True)
class AttentionSpec:
    kind: str = "gqa"                # gqa | mla
    num_heads: int = 8
    num_kv_heads: int = 8            # GQA only
    head_dim: int = 0                # 0: hidden_size // num_heads (GQA)
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0     # fraction of each head's dim that is rotated (GQA)
    qk_norm: bool = False
    # MLA (DeepSeek-V2/V3): low-rank query and key/value latents; each head's
    # key = no-position part (qk_head_dim) + a shared rope part (qk_rope_dim).
    q_lora_rank: int = 0             # 0: queries projected directly from the hidden state
    kv_lora_rank: int = 64
    qk_head_dim: int = 64
    qk_rope_dim: int = 32
    v_head_dim: int = 64
    # DSA lightning indexer (used by D layers)
    index_heads: int = 4
    index_head_dim: int = 64
    index_topk: int = 256


@dataclass(frozen=True)
class MambaSpec:
    version: int = 2                 # 2 (SSD) | 3 (trapezoidal, complex via rotary, no conv)
    state_dim: int = 64
    head_dim: int = 64
    expand: int = 2                  # d_inner = expand * hidden_size
    num_groups: int = 1              # B/C groups
    conv_width: int = 4              # Mamba-2 only
    chunk_size: int = 64
    mimo_rank: int = 1               # Mamba-3 MIMO rank; 1 = SISO (only SISO is built)
    dt_min: float = 0.001
    dt_max: float = 0.1


@dataclass(frozen=True)
class MoESpec:
    num_experts: int = 8
    top_k: int = 2
    expert_ffn: int = 256
    shared_ffn: int = 0              # 0: no shared expert
    score: str = "softmax"           # softmax | sigmoid
    bias_balancing: bool = False     # aux-loss-free per-expert bias (DeepSeek-V3)
    capacity_factor: float = 0.0     # 0: dropless; > 0: tokens over capacity are dropped
    null_experts: int = 0            # no-op experts that take routing slots
    routing: str = "token_choice"    # token_choice | expert_choice


@dataclass(frozen=True)
class RecurrentSpec:
    kind: str = "gated_deltanet"     # gated delta rule (Gated DeltaNet)
    num_heads: int = 4
    key_dim: int = 64                # per head
    value_dim: int = 64              # per head
    conv_width: int = 4
    chunk_size: int = 64


@dataclass(frozen=True)
class MTPSpec:
    depths: int = 0                  # multi-token-prediction depths (0: none)
    pattern: str = "AF"              # layers inside each MTP depth


@dataclass(frozen=True)
class ModelSpec:
    name: str = "custom"
    vocab_size: int = 32768
    hidden_size: int = 512
    depth: int = 8
    pattern: str = "AF"
    overrides: dict[int, str] = field(default_factory=dict)   # 0-based layer index -> letter
    ffn_size: int = 2048             # dense F layers
    activation: str = "swiglu"       # swiglu | geglu | gelu | relu2
    tie_embeddings: bool = False
    init_std: float = 0.02
    norm: NormSpec = field(default_factory=NormSpec)
    attention: AttentionSpec = field(default_factory=AttentionSpec)
    mamba: MambaSpec = field(default_factory=MambaSpec)
    moe: MoESpec = field(default_factory=MoESpec)
    recurrent: RecurrentSpec = field(default_factory=RecurrentSpec)
    mtp: MTPSpec = field(default_factory=MTPSpec)

    # Derived sizes used by the model, the counter and the translation.
    @property
    def attn_head_dim(self) -> int:
        a = self.attention
        return a.head_dim or self.hidden_size // a.num_heads

    @property
    def rotary_dim(self) -> int:
        """Rotated dims per GQA head (even)."""
        d = int(self.attn_head_dim * self.attention.rotary_fraction)
        return d - d % 2

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba.expand * self.hidden_size

    @property
    def mamba_heads(self) -> int:
        return self.mamba_d_inner // self.mamba.head_dim
