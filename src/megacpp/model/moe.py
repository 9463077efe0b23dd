"""Mixture of experts (layer letter E).

Routing (model.moe):
- token choice, softmax scores: each token takes its top-k router rows;
  gates are the selected probabilities, renormalised over the k slots when
  k > 1 (Mixtral); k = 1 keeps the raw probability (Switch), so the router
  still gets a gradient.
- token choice, sigmoid scores (DeepSeek-V3): independent sigmoid scores;
  with bias_balancing a per-row bias buffer is added for the *selection*
  only, the gates still come from the unbiased scores (renormalised over
  the k slots when k > 1). The bias is run state, updated from the load by
  `update_bias` (aux-loss-free balancing) and checkpointed with the model.
- expert choice (Zhou et al. 2022): each real expert takes its top-C
  tokens by score, C = ceil(capacity_factor * tokens * top_k / num_experts);
  a token may be taken by any number of experts. A token's route depends on
  the other tokens of the batch, so expert choice is not causal.
- null experts: router rows beyond num_experts. Choosing one spends a slot
  (and its share of the gate) on nothing; tokens can so take less compute.
- capacity (token choice, capacity_factor > 0): each real expert keeps at
  most C = ceil(capacity_factor * tokens * top_k / num_experts) of its
  assignments, the highest gates first (ties to the earlier token); the rest
  are dropped (their slot outputs zero). 0 = dropless. Dropping, like
  expert choice, couples the tokens of a batch.
- shared expert: a dense MLP of width shared_ffn every token passes through.

Experts run as one grouped computation: assignments are sorted by expert,
then either `torch._grouped_mm` (when the device/dtype/alignment allow) or
a padded batched matmul computes every expert at once. `moe_reference` is
the per-expert python loop the tests compare both against.
policy.kernels.moe_wgrad_splits = N (default 1: torch's own backward;
Experts.wgrad_splits, set by train.activation.apply_moe_wgrad_splits)
computes the grouped path's weight gradient with each expert's rows cut
into N parts, for more GEMM tiles where the experts are narrow
(`_GroupedMM`; nam-125m's preset takes 4: BENCHMARKS.md, eighteenth session).

Per-forward RouterStats: router logits, scores and mean probabilities
(differentiable), load per router row, and the load-balance and z-loss
terms computed from them in the forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..recipe.spec import ModelSpec
from . import init as winit
from .mlp import MLP, activate, is_gated
from .norm import fp
from ..losses.moe_aux import load_balance_loss, z_loss


@dataclass
class RouterStats:
    """What one E layer exposes per forward (T = tokens in the batch, R = router rows,
    R = num_experts + null_experts).

    logits:      (T, R) float32 router logits, differentiable (router z-loss).
    scores:      (T, R) softmax or sigmoid scores, differentiable.
    probs:       (T, R) scores normalised per token to sum 1 (softmax: the
                 scores themselves), differentiable (P_i of the switch loss).
    mean_probs:  (R,) probs averaged over tokens.
    topk_idx:    (T, k) router rows each token chose, before capacity
                 dropping (expert choice: (T, 0), it is balanced by design).
    load:        (R,) float32 assignments per router row as routed, before
                 capacity dropping (f_i's numerator; drives the bias update).
    kept:        (R,) float32 assignments that reached an expert (null rows: 0).
    dropped:     assignments dropped by capacity (0-dim int64 tensor).
    num_tokens, num_experts (real experts), top_k (expert choice: 0).
    balance:     0-dim switch load-balance term, losses.moe_aux.load_balance_loss
                 of mean_probs and load, differentiable.
    z_sq:        0-dim router z-loss, losses.moe_aux.z_loss of logits, differentiable.
    Both are computed here, inside the layer's forward, so a compiled model fuses
    their reductions with the router's (outside it they were small eager
    kernels for each E layer, forward and backward). Whether and
    how much they count stays run policy (policy.aux.moe).
    """
    logits: torch.Tensor
    scores: torch.Tensor
    probs: torch.Tensor
    mean_probs: torch.Tensor
    topk_idx: torch.Tensor
    load: torch.Tensor
    kept: torch.Tensor
    dropped: torch.Tensor
    num_tokens: int
    num_experts: int
    top_k: int
    balance: torch.Tensor
    z_sq: torch.Tensor


def router_stats(logits, scores, probs, topk_idx, load, kept, dropped, num_experts: int,
                 top_k: int) -> RouterStats:
    """RouterStats with the mean probabilities and both auxiliary terms computed
    from what the router made."""
    mean_probs = probs.mean(0)
    return RouterStats(logits, scores, probs, mean_probs, topk_idx, load, kept, dropped, logits.shape[0],
                       num_experts, top_k, balance=load_balance_loss(mean_probs, load, num_experts),
                       z_sq=z_loss(logits))


@dataclass
class Routing:
    """Kept (token, expert, gate) assignments to real experts, any order."""
    token: torch.Tensor    # (A,) int64
    expert: torch.Tensor   # (A,) int64 in [0, num_experts)
    gate: torch.Tensor     # (A,) float, differentiable
    stats: RouterStats


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: _grouped_mm's
    backward rejects the expanded (stride-0) gradients a .sum() produces."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """inverse[order[j]] = j for a permutation `order` of 0..n-1."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse


class _GatherRows(torch.autograd.Function):
    """out = v[src] where every row of out has one source row and the rows of v
    are each read `k` times (k = len(src) / len(v)); `back` lists, for the rows
    of v in order, the k rows of out that read each. Both directions are plain
    gathers (the backward a gather and a sum over k): no scatter for inductor to
    materialise, no accumulating index_put (sort-based in eager CUDA, atomics
    under inductor), deterministic. Under compile both are traced, so each
    gather fuses into the kernel that produces or consumes its rows."""

    @staticmethod
    def forward(ctx, v, src, back):
        ctx.save_for_backward(back)
        ctx.rows = v.shape[0]
        return v[src]

    @staticmethod
    def backward(ctx, g):
        (back,) = ctx.saved_tensors
        picked = g[back]
        if back.numel() == ctx.rows:
            return picked, None, None
        return picked.view(ctx.rows, -1, *g.shape[1:]).sum(1), None, None


def permute_rows(v: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor | None = None) -> torch.Tensor:
    """v[order] for a permutation `order` (inverse: its inverse, made if not given);
    the backward is the gather by `inverse` (autograd's backward of v[order]
    would add into rows through an accumulating index_put)."""
    if inverse is None:
        inverse = inverse_permutation(order)
    return _GatherRows.apply(v, order, inverse)


def gather_slots(x: torch.Tensor, order: torch.Tensor, k: int,
                 inverse: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, d) -> (T*k, d): row j holds token order[j] // k, for a permutation
    `order` of the T*k slots (slot s belongs to token s // k).

    Autograd's backward of a plain gather (x[idx], index_select) accumulates
    into repeated rows: on CUDA an index_put with accumulate, whose sort-based
    kernel took 9% of a compiled nam-125m step on an H200 (BENCHMARKS.md).
    Here the backward gathers each token's k slots (rows inverse[t*k .. t*k+k-1])
    and sums them: no atomics, no sort, deterministic."""
    T, d = x.shape
    if order.numel() != T * k:
        raise ValueError(f"gather_slots: order has {order.numel()} slots, expected T*k = {T * k}")
    if inverse is None:
        inverse = inverse_permutation(order)
    return _GatherRows.apply(x, torch.div(order, k, rounding_mode="floor"), inverse)


_GROUPED_MM_OK: dict = {}


def grouped_mm_available(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Whether torch._grouped_mm runs here: the op exists, every row stride is a
    multiple of 16 bytes (its requirement), and a tiny probe call succeeds once
    per (device type, dtype)."""
    if not hasattr(torch, "_grouped_mm") or device.type == "meta":
        return False
    esize = torch.empty((), dtype=dtype).element_size()
    if any((n * esize) % 16 for n in dims):
        return False
    key = (device.type, dtype)
    if torch.compiler.is_compiling():
        # No probing inside a trace; the op's meta kernel, which compile
        # traces with, accepts bf16 only (eager CPU also takes float32).
        return dtype == torch.bfloat16 and _GROUPED_MM_OK.get(key, True)
    if key not in _GROUPED_MM_OK:
        try:
            a = torch.zeros(8, 16, device=device, dtype=dtype)
            w = torch.zeros(2, 16, 16, device=device, dtype=dtype)
            offs = torch.tensor([4, 8], device=device, dtype=torch.int32)
            torch._grouped_mm(a, w, offs=offs)
            _GROUPED_MM_OK[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GROUPED_MM_OK[key] = False
    return _GROUPED_MM_OK[key]


def sort_keys(expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids as the narrowest sort keys that hold them: a stable radix sort
    of uint8 keys is one pass over the bytes where int64 keys take eight (CUDA:
    8 DeviceRadixSortOnesweep launches a MoE layer at nam-125m). Same order."""
    return expert.to(torch.uint8) if num_experts <= 256 else expert


def split_offsets(offs: torch.Tensor, splits: int) -> torch.Tensor:
    """Group ends `offs` (E,) -> (E * splits,): each group's rows cut into
    `splits` nearly equal consecutive parts (empty parts where it has fewer rows)."""
    starts = torch.cat([offs.new_zeros(1), offs[:-1]])
    counts = offs - starts
    parts = torch.arange(1, splits + 1, device=offs.device, dtype=offs.dtype)
    return (starts[:, None] + counts[:, None] * parts[None, :] // splits).reshape(-1)


class _GroupedMM(torch.autograd.Function):
    """torch._grouped_mm(x, w, offs) whose weight gradient runs as `splits`
    groups per expert (split-K over its rows), summed in float32: the weight
    gradient's output is per expert only d_in x d_out (768 x 768 or 1536 at
    nam-125m), a few GEMM tiles each (36-49% of an H200's bf16 peak at
    nam-125m, twelfth session's profile). The input gradient is torch's own
    (the call autograd makes). A forward on a K-major copy of w was measured
    too (fifteenth session) and removed: 16-28% slower per GEMM than the
    stored (E, d_in, d_out) layout, level in nam-1b's step."""

    @staticmethod
    def forward(ctx, x, w, offs, splits):
        ctx.save_for_backward(x, w, offs)
        ctx.splits = splits
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, g):
        x, w, offs = ctx.saved_tensors
        g = g.contiguous()
        dx = torch._grouped_mm(g, w.transpose(-2, -1), offs=offs) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            E, S = w.shape[0], ctx.splits
            if S == 1:
                dw = torch._grouped_mm(x.t(), g, offs=offs)
            else:
                parts = torch._grouped_mm(x.t(), g, offs=split_offsets(offs, S))
                dw = parts.view(E, S, *parts.shape[1:]).sum(1, dtype=torch.float32).to(w.dtype)
        return dx, dw, None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, splits: int = 1) -> torch.Tensor:
    """torch._grouped_mm(x, w, offs=offs); splits > 1 takes _GroupedMM."""
    if splits == 1:
        return torch._grouped_mm(x, w, offs=offs)
    return _GroupedMM.apply(x, w, offs, splits)


def grouped_ffn(x: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                activation: str, impl: str = "auto", low_precision: str = "none",
                wgrad_splits: int = 1, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Every expert's FFN on its own rows. x (A, d) sorted by expert; counts (E,).
    row_scale (A,), if given, multiplies each row's activation before the
    second GEMM (the gates, policy.kernels.moe_gate = "activation"): the
    FFN's output is linear in it, so the result is the output scaled per row.

    impl: "grouped_mm" | "bmm" (padded batched matmul) | "auto" (grouped_mm when available).
    low_precision: "none" | "fp8_rowwise:Q" (both GEMMs through ops.fp8_grouped:
    forward and input gradient in FP8, whatever impl says; Q the quantizer,
    "torch", "torchao" or "triton" (ops.fp8_grouped.quant_paths), or "emulate":
    every GEMM in float32, CPU tests) | "fp8_rowwise_wgrad:Q" (the weight
    gradient in FP8 too).
    wgrad_splits: the grouped_mm path's weight gradient in this many parts per
    expert (policy.kernels.moe_wgrad_splits; see _GroupedMM).
    """
    A, d = x.shape
    E = w_in.shape[0]
    if low_precision != "none":
        from ..ops.fp8_grouped import FP8GroupedMM
        kind, _, mode = low_precision.partition(":")
        if kind not in ("fp8_rowwise", "fp8_rowwise_wgrad"):
            raise ValueError(f"unknown expert low precision {low_precision!r} "
                             "(none | fp8_rowwise:QUANT | fp8_rowwise_wgrad:QUANT)")
        wg = kind == "fp8_rowwise_wgrad"
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _ContiguousGrad.apply(FP8GroupedMM.apply(x, w_in, offs, mode, wg))
        return _ContiguousGrad.apply(FP8GroupedMM.apply(activate(h, activation, row_scale), w_out, offs, mode, wg))
    if impl == "auto":
        ok = grouped_mm_available(x.device, x.dtype, d, w_in.shape[-1], w_out.shape[1], w_out.shape[-1])
        impl = "grouped_mm" if ok else "bmm"
    if impl == "grouped_mm":
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = _ContiguousGrad.apply(grouped_mm(x, w_in, offs, wgrad_splits))
        return _ContiguousGrad.apply(grouped_mm(activate(h, activation, row_scale), w_out, offs, wgrad_splits))
    if impl != "bmm":
        raise ValueError(f"unknown grouped impl {impl!r} (auto | grouped_mm | bmm)")
    # Padded: scatter each expert's rows into an (E, max_count, d) block.
    starts = torch.cumsum(counts, 0) - counts
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=A)
    pos = torch.arange(A, device=x.device) - starts[expert]
    cap = int(counts.max()) if A else 0
    buf = x.new_zeros(E, cap, d)
    buf = buf.index_put((expert, pos), x)
    sbuf = None
    if row_scale is not None:   # the scales in the same padded layout (padding rows: 0)
        sbuf = row_scale.new_zeros(E, cap).index_put((expert, pos), row_scale)
    out = torch.bmm(activate(torch.bmm(buf, w_in), activation, sbuf), w_out)
    return out[expert, pos]


ONE_HOT_LIMIT = 1 << 26  # (assignment, row) pairs count_per_row compares at once


def count_per_row(idx: torch.Tensor, n: int) -> torch.Tensor:
    """How often each of 0..n-1 occurs in idx, as int64 (n,).

    Unlike torch.bincount, the output size does not depend on idx's values,
    so CUDA needs no host sync to size it and compile sees a static shape.

    A one-hot sum, not an index_add: inductor hands an int64 index_add to
    aten's sort-based index_put(accumulate=True), which walks each row's
    repeats serially (65k assignments into 8 rows: 1.7 ms a layer for
    nam-125m on an H200, BENCHMARKS.md). The compare-and-sum is one fused
    reduction; past ONE_HOT_LIMIT (assignment, row) pairs it counts in
    chunks, so eager mode never holds a larger one-hot.
    """
    flat = idx.reshape(-1, 1)
    rows = torch.arange(n, device=idx.device)
    step = max(1, ONE_HOT_LIMIT // max(n, 1))
    if flat.shape[0] <= step:
        return (flat == rows).sum(0)
    return sum((part == rows).sum(0) for part in flat.split(step))


def capacity(num_tokens: int, top_k: int, num_experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * num_tokens * top_k / num_experts))


ARGMAX_TOPK = 4  # top-k up to this many picks by repeated argmax (see top_rows)


def top_rows(sel: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k largest values of each row of `sel`, largest
    first, ties to the lower index.

    For k <= ARGMAX_TOPK: k argmaxes, each pick masked to -inf for the next:
    row reductions over a handful of experts, which inductor can fuse with
    the router's scores (not yet measured on a GPU); torch.topk is a generic
    radix select plus a sort of its picks (two kernels, 0.075 ms a nam-125m
    MoE layer on an H200, fourteenth session's profile) and leaves ties
    unspecified. Larger k: torch.topk."""
    if k > ARGMAX_TOPK:
        return torch.topk(sel, k, dim=-1).indices
    cols = torch.arange(sel.shape[-1], device=sel.device)
    picks = []
    for _ in range(k):
        i = sel.argmax(dim=-1, keepdim=True)
        picks.append(i)
        sel = torch.where(cols == i, float("-inf"), sel)
    return torch.cat(picks, dim=-1)


def _descending_stable(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Argsort, largest first, ties to the lower index (deterministic across paths)."""
    return torch.sort(v, dim=dim, descending=True, stable=True).indices


class Experts(nn.Module):
    """Stacked expert weights laid out for x @ w: w_in (E, d, up*ffn), w_out (E, ffn, d)."""

    def __init__(self, num_experts: int, d: int, ffn: int, activation: str):
        super().__init__()
        up = 2 if is_gated(activation) else 1
        self.w_in = nn.Parameter(torch.empty(num_experts, d, up * ffn))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn, d))
        # "none" | "fp8_rowwise[_wgrad]:QUANT" (see grouped_ffn): set by the run's low-precision
        # conversion (policy.precision.expert_low_precision), never by the model spec
        self.low_precision = "none"
        # policy.kernels.moe_wgrad_splits (run policy, not identity): the grouped
        # path's weight gradient in this many parts per expert (see _GroupedMM)
        self.wgrad_splits = 1

    def init_weights(self, std: float, out_std: float) -> None:
        winit.normal_(self.w_in, std)
        winit.normal_(self.w_out, out_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, activation: str, impl: str = "auto",
                dtype: torch.dtype | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x (A, d) sorted by expert, counts (E,) -> (A, d); row_scale (A,): see
        grouped_ffn. Going through forward (not reading w_in/w_out from outside)
        lets a wrapper that hooks this module, such as an FSDP2 group of its
        own, gather the weights first."""
        dtype = dtype or x.dtype
        return grouped_ffn(x.to(dtype), counts, self.w_in.to(dtype), self.w_out.to(dtype), activation, impl,
                           self.low_precision, self.wgrad_splits, row_scale)


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        e, d = spec.moe, spec.hidden_size
        self.num_experts, self.null_experts, self.top_k = e.num_experts, e.null_experts, e.top_k
        self.rows = e.num_experts + e.null_experts
        self.score, self.routing = e.score, e.routing
        self.capacity_factor = e.capacity_factor
        self.activation = spec.activation
        # Which grouped path to take ("auto" | "grouped_mm" | "bmm"); tests pin it.
        self.impl = "auto"
        # policy.kernels.moe_gate (run policy, not identity; train.activation.apply_moe_gate):
        # False weights each expert output by its gate where a token's slots are summed
        # ("combine"); True scales each row's activation by it before the experts'
        # second GEMM ("activation"): the same function (the GEMM is linear), but the
        # backward keeps no expert outputs and needs no separate gate-gradient pass.
        self.gate_in_activation = False
        self.router = nn.Linear(d, self.rows, bias=False)
        self.experts = Experts(e.num_experts, d, e.expert_ffn, spec.activation)
        self.shared = MLP(d, e.shared_ffn, spec.activation) if e.shared_ffn else None
        if e.bias_balancing:
            # Selection-only bias (DeepSeek-V3); a buffer: the optimizer never touches it.
            self.register_buffer("expert_bias", torch.zeros(self.rows, dtype=torch.float32))
        else:
            self.expert_bias = None

    def init_weights(self, std: float, out_std: float) -> None:
        winit.normal_(self.router.weight, std)
        self.experts.init_weights(std, out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
        if self.expert_bias is not None:
            with torch.no_grad():
                self.expert_bias.zero_()

    # -- routing -----------------------------------------------------------
    def router_scores(self, x: torch.Tensor):
        """x (T, d) -> logits, scores (T, rows), computed in float32 (or float64)."""
        # Autocast would run this matmul in bf16 and flip near-tied top-k
        # choices; the router is one of the float32 modules.
        with torch.autocast(x.device.type, enabled=False):
            xf = fp(x)
            logits = F.linear(xf, self.router.weight.to(xf.dtype))
        scores = torch.softmax(logits, dim=-1) if self.score == "softmax" else torch.sigmoid(logits)
        return logits, scores

    def select_topk(self, scores: torch.Tensor):
        """Token choice: (rows (T, k), gates (T, k)); the bias moves selection only."""
        sel = scores.detach()
        if self.expert_bias is not None:
            sel = sel + self.expert_bias.to(sel.dtype)
        rows = top_rows(sel, self.top_k)
        gates = torch.gather(scores, -1, rows)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return rows, gates

    def route(self, x: torch.Tensor) -> Routing:
        T = x.shape[0]
        logits, scores = self.router_scores(x)
        probs = scores if self.score == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
        E = self.num_experts
        dev = x.device
        if self.routing == "expert_choice":
            C = min(T, capacity(T, self.top_k, E, self.capacity_factor))
            order = _descending_stable(scores.detach()[:, :E].t())[:, :C]          # (E, C) tokens
            token = order.reshape(-1)
            expert = torch.arange(E, device=dev).repeat_interleave(C)
            gate = scores[token, expert]
            load = torch.zeros(self.rows, device=dev)
            load[:E] = C
            stats = router_stats(logits, scores, probs, torch.zeros(T, 0, dtype=torch.long, device=dev), load,
                                 load.clone(), torch.zeros((), dtype=torch.long, device=dev), E, 0)
            return Routing(token, expert, gate, stats)

        rows, gates = self.select_topk(scores)
        flat_rows, flat_gate = rows.reshape(-1), gates.reshape(-1)
        flat_token = torch.arange(T, device=dev).repeat_interleave(self.top_k)
        load = count_per_row(flat_rows, self.rows).float()
        if self._dropless():
            # Dropless with only real experts: every choice is kept, so shapes
            # are static (T * k) and no boolean mask forces a host sync.
            stats = router_stats(logits, scores, probs, rows, load, load.clone(),
                                 torch.zeros((), dtype=torch.long, device=dev), E, self.top_k)
            return Routing(flat_token, flat_rows, flat_gate, stats)
        real = flat_rows < E
        keep = real
        if self.capacity_factor > 0:
            C = capacity(T, self.top_k, E, self.capacity_factor)
            # Within each expert, highest gate first; stable sorts keep ties in token order.
            by_gate = _descending_stable(flat_gate.detach())
            by_expert = by_gate[torch.sort(flat_rows[by_gate], stable=True).indices]
            counts = count_per_row(flat_rows, self.rows)
            group_start = torch.cumsum(counts, 0) - counts
            rank = torch.empty_like(flat_rows)
            rank[by_expert] = torch.arange(flat_rows.numel(), device=dev) - group_start[flat_rows[by_expert]]
            keep = real & (rank < C)
        dropped = (real & ~keep).sum()
        kept = count_per_row(flat_rows[keep], self.rows).float()
        stats = router_stats(logits, scores, probs, rows, load, kept, dropped, E, self.top_k)
        return Routing(flat_token[keep], flat_rows[keep], flat_gate[keep], stats)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing (DeepSeek-V3): raise the bias of under-loaded
        experts and lower it for over-loaded ones by `rate`. Null rows keep 0."""
        if self.expert_bias is None:
            raise RuntimeError("this MoE has no expert bias (model.moe.bias_balancing is off)")
        E = self.num_experts
        real = load[:E].float()
        self.expert_bias[:E] += rate * torch.sign(real.mean() - real)

    def _dropless(self) -> bool:
        """Token choice with every choice kept: route() returns T * k slots in token order."""
        return self.capacity_factor <= 0 and self.null_experts == 0

    # -- compute -------------------------------------------------------------
    def forward(self, x: torch.Tensor, ctx=None):
        shape = x.shape
        xt = x.reshape(-1, shape[-1])
        r = self.route(xt)
        order = torch.sort(sort_keys(r.expert, self.num_experts), stable=True).indices
        inverse = inverse_permutation(order)
        counts = count_per_row(r.expert, self.num_experts)
        dtype = x.dtype
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
        T, k = xt.shape[0], self.top_k
        slot_order = self.routing != "expert_choice" and r.token.numel() == T * k and self._dropless()
        in_act = self.gate_in_activation
        if slot_order:
            # The rows in expert order are a permutation of the T*k slots, so
            # their backward needs no accumulating scatter (see gather_slots).
            # Cast first: the gather then moves the experts' dtype (bf16 under
            # autocast), not float32 rows for a separate cast to read.
            rows = gather_slots(xt.to(dtype), order, k, inverse)
            # gate_in_activation: the gates in expert order (a permutation: its
            # backward is the gather by `inverse`) scale the activation
            row_gate = permute_rows(r.gate, order, inverse) if in_act else None
            out = self.experts(rows, counts, self.activation, self.impl, dtype, row_gate)
            # Every token holds exactly k slots (flat slot j = token j // k):
            # slot s reads expert row inverse[s] (a gather, whose backward is the
            # gather by `order`), then a token's k rows are weighted (unless the
            # activation was) and summed in float32; compiled, the gather is a
            # load of that sum's kernel. The gates are already in slot order.
            slots = fp(permute_rows(out, inverse, order).view(T, k, -1))
            if not in_act:
                slots = slots * r.gate.view(T, k, 1).to(slots.dtype)
            y = slots.sum(dim=1).to(x.dtype)
        else:
            # the gates in expert order; order is a permutation, so no accumulating backward
            token, gate = r.token[order], permute_rows(r.gate, order, inverse)
            out = self.experts(torch.index_select(xt, 0, token), counts, self.activation, self.impl, dtype,
                               gate if in_act else None)
            if not in_act:
                out = fp(out) * gate[:, None].to(fp(out).dtype)
            y = torch.zeros_like(xt).index_add(0, token, out.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(xt)[0]
        return y.reshape(shape), r.stats, None

    def step(self, x: torch.Tensor, state=None):
        return self.forward(x[:, None])[0][:, 0], None


def moe_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-expert python loop with its own dispatch: the oracle for MoE.forward.

    Shares only the router scores and the token-choice top-k with the
    module; capacity, expert choice, gathering and combining are redone here.
    """
    shape = x.shape
    xt = x.reshape(-1, shape[-1])
    T = xt.shape[0]
    E = moe.num_experts
    _, scores = moe.router_scores(xt)
    y = torch.zeros_like(xt)

    def expert_out(e, rows):
        h = xt[rows] @ moe.experts.w_in[e].to(xt.dtype)
        return activate(h, moe.activation) @ moe.experts.w_out[e].to(xt.dtype)

    if moe.routing == "expert_choice":
        C = min(T, capacity(T, moe.top_k, E, moe.capacity_factor))
        for e in range(E):
            rows = _descending_stable(scores.detach()[:, e])[:C]
            y = y.index_add(0, rows, (expert_out(e, rows) * scores[rows, e][:, None]).to(xt.dtype))
    else:
        sel, gates = moe.select_topk(scores)
        C = capacity(T, moe.top_k, E, moe.capacity_factor) if moe.capacity_factor > 0 else None
        for e in range(E):
            hit = (sel == e).nonzero()            # (n, 2) token, slot in row-major order
            rows, g = hit[:, 0], gates[hit[:, 0], hit[:, 1]]
            if C is not None:
                keep = _descending_stable(g.detach())[:C]
                rows, g = rows[keep], g[keep]
            y = y.index_add(0, rows, (expert_out(e, rows) * g[:, None]).to(xt.dtype))
    if moe.shared is not None:
        y = y + moe.shared(xt)[0]
    return y.reshape(shape)
