"""Attention mixers: GQA, MLA, and DSA (either of them with sparse key selection).

- GQA: grouped-query attention through F.scaled_dot_product_attention,
  optional per-head QK RMSNorm (before RoPE), partial rotary.
- MLA (DeepSeek-V2/V3): queries from an optional low-rank latent, keys and
  values from one normalised latent c_kv; each head's key is a no-position
  part (from c_kv) plus a rope part shared by all heads (from the hidden
  state directly). Decoding caches c_kv and the rotated rope key only, the
  point of MLA; keys/values are re-expanded from the latent each step.
- DSA (DeepSeek-V3.2, layer letter D): a lightning indexer scores every
  earlier key, I[t,s] = sum_j w[t,j] relu(q[t,j] . k[s]), and each query
  attends only to its top-k keys (through `indexer_topk_fn`: the naive
  ops.dsa_index scorer by default, the chunked one once the
  dsa_indexer_fused patch is installed). The indexer
  reads a detached copy of the hidden state, as DeepSeek does, so only its
  KL loss trains it; the per-forward DSAStats carry what that loss needs.

Packed rows: attention never crosses a document (block-diagonal causal
mask from SeqContext); without doc_ids SDPA runs with is_causal=True.
The dense attention of A layers on packed rows has two backends
(`attention_backend`): "sdpa" with the explicit (b, 1, t, t) bool mask (the
reference, and the CPU default), and "flex": FlexAttention with a document
BlockMask (the CUDA default), which keeps flash-style tiling and skips the
blocks that cross documents. D layers always take the mask path: their
top-k selection is a per-query key set, not a block pattern. Decoding
(step) always takes SDPA.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.dsa_index.reference import indexer_topk_naive
from ..recipe.spec import ModelSpec
from . import init as winit
from .context import SeqContext
from .norm import RMSNorm, fp
from .projections import project
from .rotary import apply_rotary, rope_cos_sin

try:
    from torch.nn.attention.flex_attention import flex_attention as _flex_attention
except ImportError:  # torch without FlexAttention
    _flex_attention = None

# Backend for the dense attention of A layers on packed rows. None picks at
# call time ("flex" on CUDA when flex_attention imports, else "sdpa"); "sdpa"
# or "flex" forces one, as does the environment variable MEGACPP_ATTENTION.
ATTENTION_BACKEND: str | None = None
BACKENDS = ("sdpa", "flex")


# FlexAttention's compiled kernel refuses query/key/value head dims below 16
# ("NYI: embedding dimension ... must be at least 16", torch 2.11 on an H200).
FLEX_MIN_HEAD_DIM = 16


def attention_backend(device, head_dim: int | None = None) -> str:
    """The backend packed-row A-layer attention takes on `device`; head_dim,
    the layer's smallest q/k/v head dim, keeps small heads on SDPA by default."""
    forced = ATTENTION_BACKEND or os.environ.get("MEGACPP_ATTENTION") or None
    if forced is not None:
        if forced not in BACKENDS:
            raise ValueError(f"attention backend {forced!r}: expected one of {BACKENDS}")
        if forced == "flex" and _flex_attention is None:
            raise RuntimeError(f"attention backend 'flex' forced, but torch {torch.__version__} "
                               "has no torch.nn.attention.flex_attention")
        return forced
    # flex on CUDA: its CUDA gradients match SDPA's to 1e-5 in float32
    # (tests/model/test_model_flex.py, GPU-only; passed on an H200 on
    # 2026-11-27) and it skips the blocks across documents. CPU keeps SDPA:
    # torch has no FlexAttention backward there.
    if torch.device(device).type == "cuda" and _flex_attention is not None:
        return "sdpa" if head_dim is not None and head_dim < FLEX_MIN_HEAD_DIM else "flex"
    return "sdpa"


def model_attention_backend(model: nn.Module, device) -> str:
    """What the model's packed-row A layers take: "flex", "sdpa", "flex+sdpa"
    (heads of both sizes), or "none" (no plain attention layer)."""
    kinds = sorted({attention_backend(device, m.min_head_dim) for m in model.modules()
                    if isinstance(m, _Attention) and m.indexer is None})
    return "+".join(kinds) or "none"


@dataclass
class DSAStats:
    """What one D layer exposes per forward for the indexer KL loss.

    indices:       (batch, seqlen, topk) int64 selected keys, -1 = empty slot.
    index_scores:  (batch, seqlen, topk) float32 indexer scores at those keys,
                   differentiable w.r.t. the indexer; -inf at empty slots.
    attn_target:   (batch, seqlen, topk) float32, detached: the main attention
                   probabilities at the selected keys (softmax over the
                   selected set per head), summed over heads and
                   L1-normalised; 0 at empty slots. The loss is
                   KL(attn_target || softmax(index_scores)).
    sparse:        whether the main attention used only the selected keys
                   (False in DSA's dense warm-up stage).
    """
    indices: torch.Tensor
    index_scores: torch.Tensor
    attn_target: torch.Tensor
    sparse: bool


@dataclass
class AttentionState:
    """Decoding cache of one attention layer.

    pieces: GQA (k rotated, v) each (batch, T, kv_heads, dim);
            MLA (c_kv normalised latent (batch, T, kv_lora), k_pe rotated (batch, T, rope)).
    index_k: DSA indexer keys (batch, T, index_dim), rotated; None without DSA.
    """
    pieces: tuple[torch.Tensor, ...]
    index_k: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return self.pieces[0].shape[1]


def _sdpa(q, k, v, mask):
    """q (b, t, H, d), k/v (b, T, Hk, d): SDPA in head-major layout, back to (b, t, H, dv)."""
    H, Hk = q.shape[2], k.shape[2]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=mask is None and q.shape[1] > 1, enable_gqa=H != Hk)
    return o.transpose(1, 2)


# flex_attention compiled once, lazily: uncompiled it materialises the full
# score matrix. dynamic=False: training shapes are fixed, and static shapes
# give the best kernels.
_FLEX_COMPILED = None


def _flex_fn():
    global _FLEX_COMPILED
    if torch.compiler.is_compiling():
        # Inside the trainer's compiled block: dynamo lowers the call itself;
        # a nested torch.compile would only add a graph break.
        return _flex_attention
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(_flex_attention, dynamic=False)
    return _FLEX_COMPILED


# FlexAttention launch options (its `kernel_options`) by (compute capability
# major, minor, q/k head dim) for half dtypes, from benchmarks/flex_tune.py on
# the GPU BENCHMARKS.md names; a device or head dim not listed keeps inductor's
# default launch. MEGACPP_FLEX_OPTIONS (a JSON object) replaces the table for
# every call (A/B runs). The device's capability is read eagerly, by
# note_flex_device (HybridLM calls it where it builds the block mask), since
# dynamo cannot be trusted to fold the query; the traced _flex reads dicts only.
FLEX_TUNED: dict[tuple[int, int, int], dict] = {
    # H200, torch 2.11, nam-125m's A layer (16 x 2048, 12/4 heads): forward
    # kernels 0.351 -> 0.303 ms, outputs within 1.1e-3 of the default launch's;
    # no backward variant beat inductor's (2026-11-28, thirteenth session)
    (9, 0, 64): {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64},
}
_CAPABILITY: dict[int, tuple[int, int]] = {}
_FORCED_OPTIONS: list = [None]   # [dict | None], from MEGACPP_FLEX_OPTIONS at note time


def _forced_flex_options() -> dict | None:
    raw = os.environ.get("MEGACPP_FLEX_OPTIONS") or None
    if raw is None:
        return None
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"MEGACPP_FLEX_OPTIONS: not JSON ({e})") from None
    if not isinstance(opts, dict):
        raise ValueError(f"MEGACPP_FLEX_OPTIONS: expected a JSON object, got {raw!r}")
    return opts


def note_flex_device(device) -> None:
    """Record `device`'s compute capability and MEGACPP_FLEX_OPTIONS for
    flex_kernel_options; eager code only (a no-op off CUDA)."""
    device = torch.device(device)
    _FORCED_OPTIONS[0] = _forced_flex_options()
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _CAPABILITY:
            _CAPABILITY[index] = torch.cuda.get_device_capability(index)


def flex_kernel_options(q: torch.Tensor) -> dict | None:
    """The kernel_options _flex passes for q (b, t, H, d): forced, tuned, or None."""
    if _FORCED_OPTIONS[0] is not None:
        return _FORCED_OPTIONS[0]
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    cap = _CAPABILITY.get(q.device.index)
    if cap is None:
        return None
    return FLEX_TUNED.get((cap[0], cap[1], q.shape[-1]))


def flex_launch_note(model: nn.Module, device) -> str:
    """Which launch the model's flex layers take on `device`, for the run record."""
    note_flex_device(device)
    if _FORCED_OPTIONS[0] is not None:
        return f"launch: MEGACPP_FLEX_OPTIONS {json.dumps(_FORCED_OPTIONS[0], sort_keys=True)}"
    device = torch.device(device)
    if device.type != "cuda":
        return "launch: inductor default"
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY[index]
    dims = sorted({m.qk_head_dim_for_flex for m in model.modules()
                   if isinstance(m, _Attention) and m.indexer is None})
    tuned = [d for d in dims if (cap[0], cap[1], d) in FLEX_TUNED]
    if not tuned:
        return f"launch: inductor default (sm{cap[0]}{cap[1]})"
    return f"launch: tuned for sm{cap[0]}{cap[1]}, head dim {', '.join(map(str, tuned))}"


def _flex(q, k, v, block_mask):
    """_sdpa's contract with a FlexAttention BlockMask in place of the bool mask.

    Scale: flex's default, 1/sqrt(q head dim), the same as SDPA's; v's head
    dim may differ from q/k's (MLA).
    """
    H, Hk = q.shape[2], k.shape[2]
    # Views with padded rows (MLA's v is a split of kv_up's output) come out
    # wrong from inductor's flex kernel when flex is traced inside a compiled
    # block (torch 2.13, CPU; seen in tests). contiguous() is free for the
    # rest and copies only such views.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = _flex_fn()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                   block_mask=block_mask, enable_gqa=H != Hk, kernel_options=flex_kernel_options(q))
    return o.transpose(1, 2)


def selection_mask(indices: torch.Tensor, num_keys: int) -> torch.Tensor:
    """(batch, 1, seqlen, num_keys) bool with True at the selected keys (-1 slots ignored)."""
    b, t, _ = indices.shape
    # Empty slots point at an extra column that is cut off afterwards, so a
    # False written for them can never overwrite a real selection.
    idx = torch.where(indices < 0, torch.full_like(indices, num_keys), indices)
    mask = torch.zeros(b, t, num_keys + 1, dtype=torch.bool, device=indices.device)
    mask.scatter_(-1, idx, True)
    return mask[:, None, :, :num_keys]


class Indexer(nn.Module):
    """DSA lightning indexer: few small heads, ReLU scores, per-token head weights."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        a, d = spec.attention, spec.hidden_size
        self.heads, self.dim, self.topk = a.index_heads, a.index_head_dim, a.index_topk
        self.theta = a.rope_theta
        # Half of each indexer head carries position, as in DeepSeek-V3.2's indexer.
        self.rot_dim = (self.dim // 2) - (self.dim // 2) % 2
        self.q_proj = nn.Linear(d, self.heads * self.dim, bias=False)
        self.k_proj = nn.Linear(d, self.dim, bias=False)
        self.w_proj = nn.Linear(d, self.heads, bias=False)
        # relu is positively homogeneous, so the query scale dim^-0.5 and the
        # head-count scale heads^-0.5 both fold into the weights w.
        self.w_scale = (self.heads ** -0.5) * (self.dim ** -0.5)

    def init_weights(self, std: float) -> None:
        for lin in (self.q_proj, self.k_proj, self.w_proj):
            winit.normal_(lin.weight, std)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        """x (b, t, d) -> q (b, t, heads, dim), k (b, t, dim), w (b, t, heads)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.dim)
        k = self.k_proj(x).view(b, t, 1, self.dim)
        if self.rot_dim:
            cos, sin = rope_cos_sin(positions, self.rot_dim, self.theta)
            cos, sin = cos[:, :, None], sin[:, :, None]
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        w = self.w_proj(x) * self.w_scale
        return q, k[:, :, 0], w

    @staticmethod
    def scores_at(q, k, w, indices):
        """Differentiable indexer scores at the selected keys: (b, t, topk), -inf at empty slots."""
        b, t, topk = indices.shape
        safe = indices.clamp(min=0)
        k_sel = torch.gather(fp(k), 1, safe.reshape(b, t * topk, 1).expand(-1, -1, k.shape[-1]))
        k_sel = k_sel.view(b, t, topk, -1)
        per_head = torch.einsum("bthd,btkd->bthk", fp(q), k_sel).relu()
        s = (per_head * fp(w)[..., None]).sum(dim=2)
        return s.masked_fill(indices < 0, float("-inf"))

    def select_step(self, q, k_all, w) -> torch.Tensor:
        """Top-k keys for one decoding query. q (b, heads, dim); k_all (b, T, dim); w (b, heads).

        Same score and the same order as indexer_topk: descending, ties to
        the lower key index (stable sort). Returns a (b, 1, 1, T) mask.
        """
        T = k_all.shape[1]
        s = torch.einsum("bhd,bsd->bhs", fp(q), fp(k_all)).relu()
        s = (s * fp(w)[..., None]).sum(dim=1)  # (b, T)
        mask = torch.ones(s.shape, dtype=torch.bool, device=s.device)
        if T > self.topk:
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices[:, : self.topk]
            mask = torch.zeros_like(mask).scatter_(-1, order, True)
        return mask[:, None, None, :]


def attention_target(q, k, indices, scale: float) -> torch.Tensor:
    """Heads-summed, L1-normalised attention at the selected keys (detached).

    One head at a time, so no (batch, heads, seqlen, seqlen) tensor exists.
    """
    with torch.no_grad():
        b, t, H, _ = q.shape
        group = H // k.shape[2]
        safe = indices.clamp(min=0)
        empty = indices < 0
        acc = torch.zeros(indices.shape, dtype=fp(q).dtype, device=q.device)
        for h in range(H):
            s = torch.bmm(fp(q[:, :, h]), fp(k[:, :, h // group]).transpose(1, 2)) * scale
            s = torch.gather(s, -1, safe).masked_fill(empty, float("-inf"))
            acc += torch.softmax(s, dim=-1).nan_to_num(0.0)
        return acc / acc.sum(dim=-1, keepdim=True).clamp(min=1e-30)


class _Attention(nn.Module):
    """Shared forward / decoding logic; subclasses define the projections."""

    rot_dim: int
    theta: float
    indexer: Indexer | None

    def _init_dsa(self, spec: ModelSpec, dsa: bool) -> None:
        # Registered after the projections: model_shapes lists indexer.* last.
        self.indexer = Indexer(spec) if dsa else None
        # The plain path scores every (query, key) pair into a (b, t, t) tensor;
        # the `dsa_indexer_fused` patch swaps in the chunked running top-k.
        self.indexer_topk_fn = indexer_topk_naive if dsa else None
        # Dense warm-up stage of DSA: attention over all keys while the
        # indexer learns; run state, flipped by the trainer.
        self.sparse = True

    # subclasses: _project(x, cos, sin) -> (q (b,t,H,dq), pieces); _expand(pieces) -> (k, v)
    min_head_dim: int   # the smallest of the q/k and v head dims (flex needs >= 16)

    def forward(self, x: torch.Tensor, ctx: SeqContext):
        b, t, _ = x.shape
        cos, sin = ctx.rope(self.rot_dim, self.theta)
        q, pieces = self._project(x, cos[:, :, None], sin[:, :, None])
        k, v = self._expand(pieces)
        stats = None
        index_k = None
        # Packed A layers on the flex backend never build the O(t^2) mask.
        flex = (self.indexer is None and ctx.doc_ids is not None
                and attention_backend(x.device, self.min_head_dim) == "flex")
        mask = None if flex else ctx.attn_mask()
        if self.indexer is not None:
            iq, index_k, iw = self.indexer(x.detach(), ctx.positions)
            with torch.no_grad():
                idx, _ = self.indexer_topk_fn(iq.detach(), index_k.detach(), iw.detach(),
                                              self.indexer.topk, causal=True, doc_ids=ctx.doc_ids)
            if self.sparse:
                mask = selection_mask(idx, t)
            stats = DSAStats(
                indices=idx,
                index_scores=Indexer.scores_at(iq, index_k, iw, idx),
                attn_target=attention_target(q.detach(), k.detach(), idx, q.shape[-1] ** -0.5),
                sparse=self.sparse)
        o = _flex(q, k, v, ctx.block_mask()) if flex else _sdpa(q, k, v, mask)
        y = self.o_proj(o.reshape(b, t, -1))
        state = None
        if ctx.want_state:
            state = AttentionState(tuple(p.detach() for p in pieces),
                                   None if index_k is None else index_k.detach())
        return y, stats, state

    def step(self, x: torch.Tensor, state: AttentionState):
        """One token per row: x (b, d) at position state.length."""
        b = x.shape[0]
        pos = torch.full((b, 1), state.length, dtype=torch.long, device=x.device)
        cos, sin = rope_cos_sin(pos, self.rot_dim, self.theta)
        q, new = self._project(x[:, None], cos[:, :, None], sin[:, :, None])
        pieces = tuple(torch.cat([old, n], dim=1) for old, n in zip(state.pieces, new))
        k, v = self._expand(pieces)
        mask = None
        index_k = state.index_k
        if self.indexer is not None:
            iq, ik, iw = self.indexer(x[:, None], pos)
            index_k = torch.cat([index_k, ik], dim=1)
            if self.sparse:
                mask = self.indexer.select_step(iq[:, 0], index_k, iw[:, 0])
        o = _sdpa(q, k, v, mask)
        return self.o_proj(o.reshape(b, -1)), AttentionState(pieces, index_k)


class GQAttention(_Attention):
    def __init__(self, spec: ModelSpec, dsa: bool = False):
        super().__init__()
        a, d = spec.attention, spec.hidden_size
        self.heads, self.kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, spec.attn_head_dim
        self.min_head_dim = self.head_dim
        self.qk_head_dim_for_flex = self.head_dim
        self.rot_dim, self.theta = spec.rotary_dim, a.rope_theta
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        if a.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, spec.norm.eps)
            self.k_norm = RMSNorm(self.head_dim, spec.norm.eps)
        else:
            self.q_norm = self.k_norm = None
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self._init_dsa(spec, dsa)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            winit.normal_(lin.weight, std)
        winit.normal_(self.o_proj.weight, out_std)
        for n in (self.q_norm, self.k_norm):
            if n is not None:
                n.reset_parameters()
        if self.indexer is not None:
            self.indexer.init_weights(std)

    def _project(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.reshape(b, t, self.heads, self.head_dim)
        k = k.reshape(b, t, self.kv_heads, self.head_dim)
        v = v.reshape(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), (apply_rotary(k, cos, sin), v)

    def _expand(self, pieces):
        return pieces


class MLAttention(_Attention):
    def __init__(self, spec: ModelSpec, dsa: bool = False):
        super().__init__()
        a, d = spec.attention, spec.hidden_size
        self.heads = a.num_heads
        self.nope, self.rope, self.v_dim, self.kv_rank = a.qk_head_dim, a.qk_rope_dim, a.v_head_dim, a.kv_lora_rank
        self.rot_dim, self.theta = a.qk_rope_dim, a.rope_theta
        qk = self.nope + self.rope
        self.min_head_dim = min(qk, self.v_dim)
        self.qk_head_dim_for_flex = qk
        if a.q_lora_rank:
            self.q_down = nn.Linear(d, a.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(a.q_lora_rank, spec.norm.eps)
            self.q_up = nn.Linear(a.q_lora_rank, self.heads * qk, bias=False)
            self.q_proj = None
        else:
            self.q_down = self.q_norm = self.q_up = None
            self.q_proj = nn.Linear(d, self.heads * qk, bias=False)
        self.kv_down = nn.Linear(d, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, spec.norm.eps)
        self.kv_up = nn.Linear(self.kv_rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, d, bias=False)
        self._init_dsa(spec, dsa)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.q_down, self.q_up, self.q_proj, self.kv_down, self.kv_up):
            if lin is not None:
                winit.normal_(lin.weight, std)
        winit.normal_(self.o_proj.weight, out_std)
        for n in (self.q_norm, self.kv_norm):
            if n is not None:
                n.reset_parameters()
        if self.indexer is not None:
            self.indexer.init_weights(std)

    def _project(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_up(self.q_norm(self.q_down(x)))
        q = q.view(b, t, self.heads, self.nope + self.rope)
        q = torch.cat([q[..., : self.nope], apply_rotary(q[..., self.nope:], cos, sin)], dim=-1)
        c_kv, k_pe = self.kv_down(x).split([self.kv_rank, self.rope], dim=-1)
        k_pe = apply_rotary(k_pe[:, :, None], cos, sin)[:, :, 0]
        return q, (self.kv_norm(c_kv), k_pe)

    def _expand(self, pieces):
        c_kv, k_pe = pieces
        b, T, _ = c_kv.shape
        kv = self.kv_up(c_kv).view(b, T, self.heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(b, T, self.heads, self.rope)], dim=-1)
        return k, v


def build_attention(spec: ModelSpec, dsa: bool) -> _Attention:
    kind = spec.attention.kind
    if kind == "gqa":
        return GQAttention(spec, dsa)
    if kind == "mla":
        return MLAttention(spec, dsa)
    raise ValueError(f"unknown attention kind {kind!r} (gqa | mla)")
