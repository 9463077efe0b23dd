"""Per-forward sequence context: packing, positions, masks, and causal convs.

A packed row holds several documents side by side, named by `doc_ids`
(batch, seqlen) segment ids that stay constant inside a document. Every
mixer must behave as if each document stood alone:

- attention: a block-diagonal causal mask (`attn_mask`), or the same
  pattern as a FlexAttention BlockMask (`block_mask`);
- positions: restart at 0 at every document start (`positions_from_doc_ids`);
- SSM / delta-rule states: zeroed at document starts (`starts`; the mixers
  force the log-decay there to a value whose exp is exactly 0);
- short causal convs: taps that reach into the previous document are
  zeroed (`same_doc`, used by `causal_conv1d`).

The context computes each of these once per forward and shares them between
layers. Without doc_ids every helper takes the plain causal path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops._common import RESET_LOG_DECAY  # noqa: F401  (re-exported: the models' name for it)
from .rotary import rope_cos_sin


def doc_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen) bool: True at position 0 and wherever the doc id changes."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def positions_from_doc_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document, (batch, seqlen) int64."""
    t = doc_ids.shape[1]
    idx = torch.arange(t, device=doc_ids.device).expand_as(doc_ids)
    start_idx = torch.where(doc_starts(doc_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - start_idx


def _document_mask_mod(doc_ids: torch.Tensor):
    """FlexAttention mask_mod of attn_mask()'s pattern: causal and same document."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
    return mask_mod


_CREATE_BLOCK_MASK_COMPILED = None


def _build_block_mask(doc_ids: torch.Tensor):
    """create_block_mask of the document pattern, run as code of its own (eager,
    or its own compiled graph on CUDA), never traced into a caller's graph."""
    from torch.nn.attention.flex_attention import create_block_mask

    global _CREATE_BLOCK_MASK_COMPILED
    b, t = doc_ids.shape
    build = create_block_mask
    if doc_ids.is_cuda:
        # Eager create_block_mask materialises the whole (b, t, t) mask (and
        # int64 gathers of that size) before reducing it to blocks; compiled,
        # it fuses the reduction. A fresh closure per forward does not
        # recompile: dynamo guards the code and the captured tensor's shape.
        if _CREATE_BLOCK_MASK_COMPILED is None:
            _CREATE_BLOCK_MASK_COMPILED = torch.compile(create_block_mask, dynamic=False)
        build = _CREATE_BLOCK_MASK_COMPILED
    return build(_document_mask_mod(doc_ids), b, None, t, t, device=doc_ids.device)


@torch.compiler.disable
def _block_mask_between_graphs(doc_ids: torch.Tensor):
    """_build_block_mask with a graph break around it, for a caller that traces
    the mask's construction. Traced, inductor fused it (its sort, compares and
    slices) into FlexAttention's forward kernel of the no-grad graph, which
    read out of bounds (nam-125m with compile scope "model", torch 2.11 on an
    H200, 2026-11-28: "illegal memory access" at the first evaluation, found
    with CUDA_LAUNCH_BLOCKING=1). HybridLM builds its block mask before its
    compiled body (HybridLM.compile_body) and never comes here."""
    return _build_block_mask(doc_ids)


def document_block_mask(doc_ids: torch.Tensor):
    """BlockMask (batch, 1, seqlen, seqlen) for packed rows; 128-token blocks, any seqlen."""
    if torch.compiler.is_compiling():
        return _block_mask_between_graphs(doc_ids)
    return _build_block_mask(doc_ids)


class SeqContext:
    """What every layer of one forward needs to know about the sequence."""

    def __init__(self, batch: int, seqlen: int, device, doc_ids: torch.Tensor | None = None,
                 positions: torch.Tensor | None = None, want_state: bool = False, block_mask=None):
        if doc_ids is not None and tuple(doc_ids.shape) != (batch, seqlen):
            raise ValueError(f"doc_ids must be {(batch, seqlen)}, got {tuple(doc_ids.shape)}")
        self.batch, self.seqlen, self.device = batch, seqlen, device
        self.doc_ids = doc_ids
        if positions is None:
            if doc_ids is not None:
                positions = positions_from_doc_ids(doc_ids)
            else:
                positions = torch.arange(seqlen, device=device).expand(batch, seqlen)
        elif positions.dim() == 1:
            positions = positions.expand(batch, seqlen)
        self.positions = positions
        # Prefill: mixers also return the state that decoding continues from.
        self.want_state = want_state
        self._memo: dict = {}
        if block_mask is not None:
            # built by the caller for these doc_ids (HybridLM: outside its compiled body)
            if doc_ids is None:
                raise ValueError("a block mask needs the doc_ids it was built from")
            self._memo["block_mask"] = block_mask

    # -- packing ---------------------------------------------------------
    @property
    def starts(self) -> torch.Tensor | None:
        """Document starts (batch, seqlen) bool, or None for unpacked rows."""
        if self.doc_ids is None:
            return None
        if "starts" not in self._memo:
            self._memo["starts"] = doc_starts(self.doc_ids)
        return self._memo["starts"]

    def same_doc(self, k: int) -> torch.Tensor:
        """(batch, seqlen) bool: token t-k exists and is in t's document."""
        key = ("same_doc", k)
        if key not in self._memo:
            from ..ops.causal_conv.reference import same_doc_mask
            self._memo[key] = same_doc_mask(self.doc_ids, k)
        return self._memo[key]

    def attn_mask(self) -> torch.Tensor | None:
        """Block-diagonal causal mask (batch, 1, seqlen, seqlen), None when unpacked."""
        if self.doc_ids is None:
            return None
        if "attn_mask" not in self._memo:
            d = self.doc_ids
            causal = torch.ones(self.seqlen, self.seqlen, dtype=torch.bool, device=d.device).tril()
            self._memo["attn_mask"] = (causal & (d[:, :, None] == d[:, None, :]))[:, None]
        return self._memo["attn_mask"]

    def block_mask(self):
        """attn_mask()'s pattern as a FlexAttention BlockMask, None when unpacked.

        Built once per forward and shared by every layer; it never holds the
        (seqlen, seqlen) mask, only per-128-block indices.
        """
        if self.doc_ids is None:
            return None
        if "block_mask" not in self._memo:
            self._memo["block_mask"] = document_block_mask(self.doc_ids)
        return self._memo["block_mask"]

    # -- up front ----------------------------------------------------------
    def precompute(self, rope: tuple = (), conv_widths: tuple = (), attn_mask: bool = False,
                   block_mask: bool = False) -> None:
        """Fill the memo before the first layer with what the layers will ask for.

        Under per-block torch.compile the layers share one frame that guards
        on which keys the memo holds: a memo growing layer by layer gives the
        first layer of each family its own graph, and a hybrid runs out of
        dynamo's recompile budget. Filled up front, every layer sees the same
        memo. rope: (rot_dim, theta) pairs; conv_widths: short-conv kernel sizes.
        """
        for rot_dim, theta in rope:
            self.rope(rot_dim, theta)
        if self.doc_ids is None:
            return
        self.starts  # noqa: B018  (fills the memo)
        for K in conv_widths:
            for k in range(1, min(K, self.seqlen)):
                self.same_doc(k)
        if attn_mask:
            self.attn_mask()
        if block_mask:
            self.block_mask()

    # -- positions -------------------------------------------------------
    def rope(self, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (batch, seqlen, rot_dim/2) for this forward's positions."""
        key = ("rope", rot_dim, float(theta))
        if key not in self._memo:
            self._memo[key] = rope_cos_sin(self.positions, rot_dim, theta)
        return self._memo[key]


def reset_log_decay(log_decay: torch.Tensor, ctx: SeqContext) -> torch.Tensor:
    """Force the log-decay (batch, seqlen, heads) to RESET_LOG_DECAY at doc starts."""
    starts = ctx.starts
    if starts is None:
        return log_decay
    return torch.where(starts[..., None], torch.full_like(log_decay, RESET_LOG_DECAY), log_decay)


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  ctx: SeqContext, activation: str | None = None) -> torch.Tensor:
    """Depthwise causal conv over time (then `activation`, None or "silu"), with
    the taps that reach into an earlier document dropped. x (batch, seqlen,
    channels); weight (channels, 1, K). See ops.causal_conv.reference for the
    definition and its rounding; this takes the Triton kernels on CUDA and
    the reference (with this context's memoised masks) elsewhere."""
    from ..ops.causal_conv import causal_conv1d_fast

    return causal_conv1d_fast(x, weight, bias, ctx.doc_ids, activation,
                              same_doc=ctx.same_doc if ctx.doc_ids is not None else None)


def conv_tail(x: torch.Tensor, K: int) -> torch.Tensor:
    """The last K-1 inputs (batch, K-1, channels), zero-padded on the left: a conv's decoding state."""
    b, t, c = x.shape
    if K <= 1:
        return x.new_zeros(b, 0, c)
    tail = x[:, max(0, t - (K - 1)):]
    if tail.shape[1] < K - 1:
        tail = F.pad(tail, (0, 0, K - 1 - tail.shape[1], 0))
    return tail


def conv_step(x_t: torch.Tensor, state: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal-conv step. x_t (batch, channels); state (batch, K-1, channels)."""
    window = torch.cat([state, x_t[:, None]], dim=1)          # (b, K, c)
    y = torch.einsum("bkc,ck->bc", window.to(weight.dtype), weight[:, 0, :])
    if bias is not None:
        y = y + bias
    return y.to(x_t.dtype), window[:, 1:]  # x's dtype, as causal_conv1d
