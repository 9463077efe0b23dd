"""Helpers shared by the Triton kernel modules (ops/ssd/triton_ssd.py and
ops/delta_rule/triton_delta_rule.py): the interpreter switch and its numpy
fix, the float32-accumulating dot helper, block sizes, the matmul operand
dtype, and the device context of the custom ops.

Importing this module imports triton; only the two kernel modules import it
(megacpp itself never needs triton).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# Tags of the kernels' custom ops: their launchers read every input's strides,
# so inductor may hand them any layout. Without it inductor copies an input
# whose strides it changed (the in_proj output it pads to 3392 columns was
# copied back to 3352 before the conv, forward and backward: 117 MB a layer each).
FLEXIBLE_LAYOUT = (torch.Tag.flexible_layout,) if hasattr(torch.Tag, "flexible_layout") else ()


def fix_interpreter_index() -> None:
    """TRITON_INTERPRET=1 with numpy >= 2.4: the interpreter turns a scalar
    into an int with int(array of shape (1,)), which numpy 2.4 refuses, so
    every `range(...)` over a runtime value fails (triton-lang/triton#9171,
    present in triton 3.6). Re-register __index__ to take the one element."""
    try:
        from triton.runtime import interpreter as _ti
    except Exception:
        return
    orig = getattr(_ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_megacpp_fixed", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._megacpp_fixed = True
    _ti._patch_lang_tensor = patched


if INTERPRET:
    fix_interpreter_index()


_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def mul_rn(a, b):
    """a * b rounded, and never contracted into a later add or subtract.

    Triton compiles with FP fusion on, so `t - a * b` may become one FMA that
    subtracts the unrounded product: where t was summed from the rounded
    product (an exclusive prefix as cumsum(g) - g), the difference is then the
    product's rounding error instead of an exact 0. libdevice's mul_rn is a
    `mul.rn`, which PTX never fuses. (The interpreter, numpy, never fuses.)"""
    if _INTERP:
        return a * b
    else:
        return libdevice.mul_rn(a, b)


@triton.jit
def mm(a, b, DOT: tl.constexpr, IEEE: tl.constexpr):
    """a @ b with operands cast to DOT, accumulated in float32."""
    if IEEE:
        return tl.dot(a.to(DOT), b.to(DOT), input_precision="ieee")
    else:
        return tl.dot(a.to(DOT), b.to(DOT))


def p2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


def blk(v: int, cap: int) -> int:
    """Block covering v (at least 16, tl.dot's minimum), capped."""
    return max(16, min(cap, p2(v)))


def dot_dtype(x: torch.Tensor):
    """(operand dtype of tl.dot, whether fp32 operands need input_precision='ieee')."""
    if x.dtype == torch.float16:
        return tl.float16, False
    if x.dtype == torch.bfloat16 and not INTERPRET:
        return tl.bfloat16, False
    return tl.float32, True


def device_ctx(t: torch.Tensor):
    """The CUDA device of t made current (kernels launch on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
