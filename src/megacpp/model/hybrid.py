"""HybridLM: embedding -> one Block per pattern letter -> final norm -> head,
plus optional multi-token-prediction (MTP) depths.

Parameter names and shapes are exactly recipe.shapes.model_shapes(spec), in
its order except where nn.Module lists a module's own parameters (Mamba's
A_log, D, dt_bias, B/C biases; the recurrent A_log, dt_bias) before those of
its children.

MTP (DeepSeek-V3): depth k (0-based) predicts token i+k+2 at position i.
    h'_i = proj(cat(hnorm(h_i), enorm(embed(token_{i+k+1}))))
    -> the depth's layers -> norm -> the shared head,
where h is the main model's last residual stream for k = 0 and the previous
depth's for k > 0. The last k+1 positions of a row have no token to embed
(and no target); their embedding is zero, as it is where the shifted token
belongs to another document of a packed row, so depth k never reads across
a document either. The loss must ignore those positions.

Incremental decoding: `prefill(input_ids) -> (logits_last, cache)` runs the
full forward once and keeps each layer's state; `step(token_ids, cache)`
advances every row by one token. Token-by-token logits equal the full
forward's (the tests check it), except where the function itself couples
tokens of a batch: MoE capacity dropping and expert-choice routing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..recipe.pattern import parse_pattern
from ..recipe.shapes import mtp_letters
from ..recipe.spec import ModelSpec
from . import init as winit
from .block import Block, variant_name
from .context import SeqContext, document_block_mask
from .moe import RouterStats
from .norm import build_norm


@dataclass
class ModelOutput:
    """What HybridLM.forward returns.

    hidden:     (b, t, d) final-normed hidden states (the head's input).
    logits:     (b, t, vocab) or None when return_hidden_only (training uses a
                fused linear cross-entropy on hidden and model.head_weight).
    collected:  layer index -> (b, t, d) residual stream after that layer
                (collect_hidden="final" gives the last layer), for STP.
    aux:        {"moe": [RouterStats of every E layer], "dsa": [DSAStats of every
                D layer], "layers": {layer index: stats}}; lists in module order
                (main layers, then MTP layers, keyed "mtp.{k}.{j}" in "layers").
    mtp_hidden: per MTP depth, (b, t, d) normed hidden states (see module doc
                for the positions to ignore).
    mtp_logits: per MTP depth, logits through the shared head, or None when
                return_hidden_only.
    """
    hidden: torch.Tensor
    logits: torch.Tensor | None = None
    collected: dict = field(default_factory=dict)
    aux: dict = field(default_factory=dict)
    mtp_hidden: list = field(default_factory=list)
    mtp_logits: list | None = None


@dataclass
class DecodeCache:
    """Per-layer decoding states (None for MoE / MLP) and the tokens seen so far."""
    layers: list
    length: int


def _record_aux(aux: dict, key, stats) -> None:
    if stats is None:
        return
    aux["layers"][key] = stats
    aux["moe" if isinstance(stats, RouterStats) else "dsa"].append(stats)


class MTPDepth(nn.Module):
    def __init__(self, spec: ModelSpec, k: int):
        super().__init__()
        d = spec.hidden_size
        self.hnorm = build_norm(spec.norm.kind, d, spec.norm.eps)
        self.enorm = build_norm(spec.norm.kind, d, spec.norm.eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(Block(spec, c, f"mtp.{k}.{j}") for j, c in enumerate(mtp_letters(spec)))
        self.norm = build_norm(spec.norm.kind, d, spec.norm.eps)

    def init_weights(self, std: float, out_std: float) -> None:
        for n in (self.hnorm, self.enorm, self.norm):
            n.reset_parameters()
        winit.normal_(self.proj.weight, std)
        for layer in self.layers:
            layer.init_weights(std, out_std)


class HybridLM(nn.Module):
    # run policy, not identity (policy.precision.residual, set by train.precision):
    # None keeps the embedding's dtype for the stream between layers; a dtype casts to it
    residual_dtype: torch.dtype | None = None

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.pattern = parse_pattern(spec.pattern, spec.depth, spec.overrides)
        d, V = spec.hidden_size, spec.vocab_size
        # Built on the meta device, then allocated once on the current default
        # device and initialised once by init_weights (PyTorch's per-module
        # default init would otherwise run first, only to be overwritten).
        device = torch.empty(0).device
        with torch.device("meta"):
            self.embed = nn.Embedding(V, d)
            self.layers = nn.ModuleList(Block(spec, l.letter, l.index) for l in self.pattern.layers)
            self.final_norm = build_norm(spec.norm.kind, d, spec.norm.eps)
            self.head = None if spec.tie_embeddings else nn.Linear(d, V, bias=False)
            self.mtp = nn.ModuleList(MTPDepth(spec, k) for k in range(spec.mtp.depths))
        self.to_empty(device=device)
        self.init_weights()

    # -- parameters ------------------------------------------------------------
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; also after meta-device to_empty()."""
        std = self.spec.init_std
        ostd = winit.out_std(std, self.spec.depth)
        winit.normal_(self.embed.weight, std)
        for layer in self.layers:
            layer.init_weights(std, ostd)
        self.final_norm.reset_parameters()
        if self.head is not None:
            winit.normal_(self.head.weight, std)
        for depth in self.mtp:
            depth.init_weights(std, ostd)

    @property
    def head_weight(self) -> torch.Tensor:
        """The (vocab, d) output matrix: the embedding when tied."""
        return self.embed.weight if self.head is None else self.head.weight

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def layer_report(self) -> list[dict]:
        """Per layer: index, letter, family, variant, norm seam, parameter count."""
        out = []
        for desc, layer in zip(self.pattern.layers, self.layers):
            out.append({
                "index": desc.index, "letter": desc.letter, "family": desc.family,
                "variant": variant_name(self.spec, desc.letter), "seam": layer.seam,
                "params": sum(p.numel() for p in layer.parameters()),
                "overridden": desc.overridden, "stage": desc.stage,
            })
        return out

    # -- forward -----------------------------------------------------------------
    def _collect_set(self, collect_hidden) -> set[int]:
        if collect_hidden is None:
            return set()
        if collect_hidden == "final":
            return {len(self.layers) - 1}
        want = {int(i) for i in collect_hidden}
        bad = [i for i in want if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"collect_hidden layers {bad} are outside the model (depth {len(self.layers)})")
        return want

    def forward(self, input_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, collect_hidden=None,
                return_hidden_only: bool = False) -> ModelOutput:
        """input_ids (b, t); doc_ids (b, t) segment ids of packed documents;
        positions (b, t) or (t,) (default: restart at 0 per document);
        collect_hidden: None | "final" | list of layer indices."""
        want = tuple(sorted(self._collect_set(collect_hidden)))
        b, t = input_ids.shape
        ctx = SeqContext(b, t, input_ids.device, doc_ids, positions,
                         block_mask=self._block_mask(doc_ids))
        self._precompute_context(ctx)
        return self._body(input_ids, ctx, want, return_hidden_only)

    def compile_body(self, **kwargs) -> None:
        """One torch.compile graph for the whole forward but the sequence context
        (compile scope "model"): FlexAttention's block mask, the rotary tables
        and the conv masks are built before it, as under per-block compile, and
        enter the graph as inputs. Traced into the model's graph, inductor fused
        the mask's construction into flex's forward kernel, which read out of
        bounds, and recomputed the rotary tables' cos/sin inside every attention
        layer's kernels (+10 ms of nam-125m's step; torch 2.11, H200, 2026-11-28)."""
        self._body = torch.compile(self._body, **kwargs)

    def _block_mask(self, doc_ids: torch.Tensor | None):
        """FlexAttention's block mask for these packed rows, or None where no A
        layer takes flex; built outside the compiled body (see compile_body)."""
        if doc_ids is None or "flex" not in self._attention_kinds(doc_ids.device):
            return None
        from .attention import note_flex_device
        note_flex_device(doc_ids.device)  # the flex layers' tuned launch needs the device's capability
        return document_block_mask(doc_ids)

    def _body(self, input_ids: torch.Tensor, ctx: SeqContext, want: tuple, return_hidden_only: bool):
        x = self.embed(input_ids)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        aux: dict = {"moe": [], "dsa": [], "layers": {}}
        collected: dict = {}
        for i, layer in enumerate(self.layers):
            x, a, _ = layer(x, ctx)
            _record_aux(aux, i, a)
            if i in want:
                collected[i] = x
        hidden = self.final_norm(x)
        out = ModelOutput(hidden=hidden, collected=collected, aux=aux)
        if not return_hidden_only:
            out.logits = F.linear(hidden, self.head_weight)
            out.mtp_logits = []
        h = x
        for k, depth in enumerate(self.mtp):
            h = self._mtp_depth(depth, k, h, input_ids, ctx, aux)
            hk = depth.norm(h)
            out.mtp_hidden.append(hk)
            if not return_hidden_only:
                out.mtp_logits.append(F.linear(hk, self.head_weight))
        return out

    def _context_needs(self) -> tuple:
        """(rope (rot_dim, theta) pairs, conv widths, any D layer, the A layers' smallest head dims)."""
        from .attention import _Attention

        if getattr(self, "_ctx_needs", None) is None:
            rope, convs, dense, plain_dims = set(), set(), False, set()
            for m in self.modules():
                if isinstance(m, _Attention):
                    if m.rot_dim:
                        rope.add((m.rot_dim, float(m.theta)))
                    if m.indexer is not None:
                        dense = True       # D layers always take the explicit mask
                    else:  # A layers: the mask, or flex's block mask
                        plain_dims.add(m.min_head_dim)
                conv = getattr(m, "conv1d", None)
                if isinstance(conv, nn.Conv1d):
                    convs.add(conv.kernel_size[0])
                if isinstance(getattr(m, "conv_width", None), int):
                    convs.add(m.conv_width)
            self._ctx_needs = (tuple(sorted(rope)), tuple(sorted(convs)), dense, tuple(sorted(plain_dims)))
        return self._ctx_needs

    def _attention_kinds(self, device) -> set:
        """The backends the plain A layers take for packed rows on `device`
        (each picks by its head dims)."""
        from .attention import attention_backend

        return {attention_backend(device, d) for d in self._context_needs()[3]}

    def _precompute_context(self, ctx: SeqContext) -> None:
        """Everything this model's layers (MTP depths included) read from ctx, computed once up front."""
        rope, convs, dense, plain_dims = self._context_needs()
        kinds = (self._attention_kinds(ctx.doc_ids.device) if ctx.doc_ids is not None
                 else {"sdpa"} if plain_dims else set())
        ctx.precompute(rope=rope, conv_widths=convs, attn_mask=dense or "sdpa" in kinds,
                       block_mask="flex" in kinds)

    def _mtp_depth(self, depth: MTPDepth, k: int, h, input_ids, ctx: SeqContext, aux: dict):
        b, t = input_ids.shape
        s = k + 1
        ids = torch.zeros_like(input_ids)
        valid = torch.zeros_like(input_ids, dtype=torch.bool)
        if s < t:
            ids[:, : t - s] = input_ids[:, s:]
            valid[:, : t - s] = True
            if ctx.doc_ids is not None:
                valid[:, : t - s] &= ctx.doc_ids[:, s:] == ctx.doc_ids[:, : t - s]
        e = self.embed(ids) * valid[..., None].to(h.dtype)
        h = depth.proj(torch.cat([depth.hnorm(h), depth.enorm(e)], dim=-1))
        for layer in depth.layers:
            h, a, _ = layer(h, ctx)
            _record_aux(aux, layer.key, a)
        return h

    # -- decoding ----------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, DecodeCache]:
        """Run the prompt (b, t), one document per row; return the last position's
        logits (b, vocab) and the cache `step` continues from."""
        b, t = input_ids.shape
        ctx = SeqContext(b, t, input_ids.device, want_state=True)
        x = self.embed(input_ids)
        states = []
        for layer in self.layers:
            x, _, st = layer(x, ctx)
            states.append(st)
        logits = F.linear(self.final_norm(x[:, -1]), self.head_weight)
        return logits, DecodeCache(states, t)

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:
        """Advance each row by one token (b,) or (b, 1); updates cache in place;
        returns logits (b, vocab)."""
        x = self.embed(token_ids.reshape(-1))
        for i, layer in enumerate(self.layers):
            x, cache.layers[i] = layer.step(x, cache.layers[i])
        cache.length += 1
        return F.linear(self.final_norm(x), self.head_weight)
