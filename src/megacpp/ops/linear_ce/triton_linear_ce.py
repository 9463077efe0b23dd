"""Fused linear + cross-entropy with large token chunks: the GEMMs in the
operands' half dtype, the loss and d loss / d logits in one Triton kernel.

The reference (reference.py) forms float32 logits; Liger's op (the patch's
other CUDA backend) picks chunks of about vocab / hidden tokens (1024 at
nam-125m's 768 x 32768), where the weight gradient's GEMM has K = 1024 and
ran at 48% of an H200's bf16 peak (twelfth session's profile: the head's
three GEMMs 8.1 ms of a 87 ms step). Here a chunk is `chunk_size` tokens
(4096 by default: the chunk's bf16 logits are 256 MiB at vocab 32768), per
chunk:

    logits = h @ W^T                  (half dtype, float32 accumulation)
    loss, logits <- d loss/d logits   (_ce_rows_kernel, in place, float32 math)
    d_hidden[chunk] = grad @ W
    d_weight += grad^T @ h            (float32 accumulation: mm with out_dtype)

The gradient is exact up to the half dtype's rounding of the logits, as
Liger's. Reduction "mean"/"sum" only: the gradient is formed in the forward
(the backward rescales it by the upstream scalar); "none" goes to the
reference, whose backward recomputes each chunk with per-token upstream
gradients. Importing this module imports triton.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from .._triton_util import device_ctx
from .reference import _check, linear_cross_entropy

HALF = (torch.bfloat16, torch.float16)


@triton.jit
def _ce_rows_kernel(logits_ptr, stride_row, target_ptr, loss_ptr, scale_ptr, V, ignore_index,
                    BLOCK: tl.constexpr):
    """One row: loss = logsumexp(x) - x[target] (0 if ignored), then x <- (softmax(x) - onehot) * scale."""
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    tgt = tl.load(target_ptr + row)
    valid = tgt != ignore_index
    # clamped: an out-of-vocab target (unchecked here, see linear_cross_entropy_triton)
    # gives a wrong loss, never a read outside the row
    safe_t = tl.minimum(tl.maximum(tl.where(valid, tgt, 0), 0), V - 1)
    offs = tl.arange(0, BLOCK)
    # online max / sum of exp over the row, float32
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        # lanes still at -inf (masked tail) keep s = 0 without exp(-inf - -inf) = NaN
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        s = s * alpha + tl.where(m_new == float("-inf"), 0.0, tl.exp(x - m_new))
        m = m_new
    row_max = tl.max(m, 0)
    total = tl.sum(s * tl.where(m == float("-inf"), 0.0, tl.exp(m - row_max)), 0)
    lse = row_max + tl.log(total)
    picked = tl.load(base + safe_t).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
    scale = tl.load(scale_ptr).to(tl.float32) * valid.to(tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == safe_t, 1.0, 0.0)
        tl.store(base + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=cols < V)


def ce_rows_(logits: torch.Tensor, target: torch.Tensor, scale: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-row losses (float32) of `logits` (rows, vocab), which become, in
    place, scale * (softmax - onehot(target)), zero at ignored rows. scale: a
    one-element tensor (a device value: no host sync)."""
    if logits.stride(1) != 1:
        raise ValueError("ce_rows_: logits must be contiguous along the vocab")
    n, V = logits.shape
    losses = torch.empty(n, device=logits.device, dtype=torch.float32)
    if n:
        block = min(4096, triton.next_power_of_2(V))
        with device_ctx(logits):
            _ce_rows_kernel[(n,)](logits, logits.stride(0), target, losses, scale, V, ignore_index,
                                  BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return losses


# How d_weight accumulates on CUDA: "addmm out_dtype" (cuBLAS, half operands,
# float32 output accumulated in place: torch >= 2.8), else "mm out_dtype + add",
# else "half mm + add" (rounds each chunk's sum to half: only if the others fail).
# Set at the first CUDA call; bench/run records read it.
DW_PATH: str | None = None
_DW_PATHS = ("addmm out_dtype", "mm out_dtype + add", "half mm + add")


def _dw_step(path: str, d_weight, grad, h) -> None:
    if path == "addmm out_dtype":
        torch.addmm(d_weight, grad.T, h, out_dtype=d_weight.dtype, out=d_weight)
    elif path == "mm out_dtype + add":
        d_weight.add_(torch.mm(grad.T, h, out_dtype=d_weight.dtype))
    else:
        d_weight.add_(grad.T @ h)


def _accumulate_dw(d_weight: torch.Tensor, grad: torch.Tensor, h: torch.Tensor) -> None:
    """d_weight (float32) += grad^T @ h, accumulated in float32 for half operands."""
    global DW_PATH
    if d_weight.dtype == grad.dtype:
        d_weight.addmm_(grad.T, h)
    elif not grad.is_cuda:  # no half-to-float32 GEMM off CUDA (the interpreter tests)
        d_weight.addmm_(grad.T.to(d_weight.dtype), h.to(d_weight.dtype))
    elif DW_PATH is not None:
        _dw_step(DW_PATH, d_weight, grad, h)
    else:
        for path in _DW_PATHS:
            before = d_weight.clone()
            try:
                _dw_step(path, d_weight, grad, h)
                DW_PATH = path
                return
            except (RuntimeError, TypeError, NotImplementedError):
                d_weight.copy_(before)  # a path that failed part-way leaves nothing behind
        raise RuntimeError("linear_ce triton: no d_weight accumulation path ran")


class _LinearCrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, reduction, chunk_size, dt, grads):
        n = hidden.shape[0]
        h_all = hidden.to(dt)
        w = weight.to(dt)  # one cast of the weight, not one per chunk
        valid = target != ignore_index
        n_valid = valid.sum()
        if reduction == "mean":
            scale = 1.0 / n_valid.clamp(min=1).to(torch.float32)
        else:
            scale = torch.ones((), device=hidden.device, dtype=torch.float32)
        scale = scale.reshape(1)
        # grads: autograd will want them (grad mode on at the call); evaluation
        # under no_grad then runs only the logits GEMM and the loss
        need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        d_hidden = torch.empty_like(h_all) if need_h else None
        d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        losses = torch.empty(n, device=hidden.device, dtype=torch.float32)
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            h = h_all[s:e]
            logits = h @ w.T
            losses[s:e] = ce_rows_(logits, target[s:e], scale, ignore_index)
            if d_hidden is not None:
                torch.mm(logits, w, out=d_hidden[s:e])
            if d_weight is not None:
                _accumulate_dw(d_weight, logits, h)
            del logits
        out = losses.sum() / n_valid if reduction == "mean" else losses.sum()
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        d_hidden, d_weight = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        # the upstream scale in float32 (the trainer's lm_scale / accum would round in bf16)
        dh = (d_hidden.float() * grad_out.float()).to(h_dtype) if d_hidden is not None else None
        dw = (d_weight * grad_out.to(torch.float32)).to(w_dtype) if d_weight is not None else None
        return dh, dw, None, None, None, None, None, None


def linear_cross_entropy_triton(hidden, weight, target, ignore_index=-100, reduction="mean", chunk_size=4096):
    """linear_cross_entropy's contract (reference.py), large chunks and half GEMMs.

    GEMM operands in operand_dtype(hidden, weight) (the weight cast to it once).
    "none" is the reference's (see the module doc). Unlike the reference it
    does not check target values against the vocab (that needs a host sync
    per call); the loader's tokens are checked against the tokenizer's vocab.
    """
    _check(hidden, weight, target, reduction, chunk_size, ignore_index, values=False)
    if reduction == "none":
        return linear_cross_entropy(hidden, weight, target, ignore_index, reduction, chunk_size)
    dt = operand_dtype(hidden, weight)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropyTriton.apply(hidden, weight, target.contiguous(), ignore_index,
                                               reduction, chunk_size, dt, torch.is_grad_enabled())


def operand_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The GEMMs' operand dtype: the autocast dtype where autocast is on (the
    trainer hands float32 hidden states and the float32 master weight, as a
    Linear under autocast gets them), else hidden's half dtype, else the
    weight's. Found on an H200 (2026-11-28): without the autocast case the
    head ran as TF32 GEMMs, 8 ms a step slower than Liger."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype if hidden.dtype in HALF else weight.dtype
