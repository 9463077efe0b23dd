"""Gradients of a step's micro-batches summed into the kept .grads, one fused pass each.

Under CUDA graphs (train.compile.keep_grads_outside_graphs) every trainable
parameter keeps a .grad of its own, and autograd's AccumulateGrad adds each
graph-made gradient into it with one kernel per parameter: 334 float32 adds
a nam-125m step (167 parameters, two micro-batches; 1.75 ms of GPU and as
many launches, seventeenth session's profile), after a zeroing pass. Here the
backward hands the gradients back (torch.autograd.grad) and one foreach call
copies them into the .grads at a step's first micro-batch (no zeroing pass:
0 + g is g) and adds them at the later ones: the same sums, added in the same
order as AccumulateGrad adds them.

Opt-in: MEGACPP_GRAD_SUM=foreach (the default, "autograd", is a plain
.backward()). Measured on nam-125m (H200, nineteenth session, two alternating
pairs; BENCHMARKS.md): the same tokens/s within 0.1%, and the peak 0.094 GiB
higher (19.186 against 19.092 GiB), the handed-back gradients living beside
the kept .grads. It also stays off wherever something else owns the
gradients: under DDP or FSDP2 (their hooks reduce them), and where .grads are
not kept (without CUDA graphs the first micro-batch's gradient becomes the
.grad at no cost). The manifest's backend.grad_sum names the path that ran.
"""
from __future__ import annotations

import os

import torch

ENV = "MEGACPP_GRAD_SUM"


class GradAccumulator:
    """backward(loss) per micro-batch, step_done() after the optimizer step."""

    def __init__(self, model: torch.nn.Module, enabled: bool):
        choice = os.environ.get(ENV, "autograd").strip() or "autograd"
        if choice not in ("autograd", "foreach"):
            raise ValueError(f"{ENV}={choice!r}: expected autograd or foreach")
        enabled = enabled and choice == "foreach"
        self.params = [p for p in model.parameters() if p.requires_grad] if enabled else []
        self.enabled = bool(self.params)
        self.fresh = True   # the next backward is its step's first: copy, do not add

    def backward(self, loss: torch.Tensor) -> None:
        if not self.enabled:
            loss.backward()
            return
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        if self.fresh:
            for p in self.params:
                if p.grad is None:   # dropped by someone's zero_grad(set_to_none=True)
                    p.grad = torch.zeros_like(p)
        dst = [p.grad for p, g in zip(self.params, grads) if g is not None]
        src = [g for g in grads if g is not None]
        if self.fresh:
            # a parameter this micro-batch did not reach starts the step at zero
            unused = [p.grad for p, g in zip(self.params, grads) if g is None]
            if unused:
                torch._foreach_zero_(unused)
            if dst:
                torch._foreach_copy_(dst, src)
        elif dst:
            torch._foreach_add_(dst, src)
        self.fresh = False

    def step_done(self) -> None:
        """The step's gradients are used: the next backward starts the next sum."""
        self.fresh = True

    def zero_grad(self, opt, set_to_none: bool) -> None:
        """After a step: the optimizer's zero_grad, or nothing where the next
        backward's copy overwrites every kept .grad (no zeroing pass)."""
        if self.enabled:
            self.step_done()
        else:
            opt.zero_grad(set_to_none=set_to_none)
