"""NVFP4, emulated: block-scaled FP4 rounding of both GEMM inputs in the forward.

Hopper has no FP4 tensor cores, so this path shows the numerical effect of
NVFP4 GEMM inputs, not its speed (it is slower than bf16). The format:

  * values in blocks of 16 along the GEMM's reduction dim (the last dim of
    both the activation (..., in) and the weight (out, in));
  * each value is an FP4 e2m1 number: sign and {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  * each block has a scale, its amax / 6, stored as float8 e4m3
    (torch.float8_e4m3fn) relative to a per-tensor float32 global scale
    amax_tensor / (6 * 448), so the largest block scale lands on e4m3's 448;
  * a value is x / (block_scale * global), rounded to the nearest grid point,
    ties to the even code (the one whose mantissa bit is 0), saturating at 6.

The exact operation order (each step a float32 operation) is the contract
that `reference.py` reimplements element by element and the tests compare
bitwise:
  g      = amax / 2688                 (1.0 when amax == 0)
  ratio  = min((block_amax / 6) / g, 448)
  s      = e4m3(ratio)                 (round to nearest even)
  v      = x / (float(s) * g)          (signed 0 where that scale is 0)
  q      = e2m1(v)                     (round to nearest even, clamp to 6)
  x_hat  = (q * float(s)) * g

q * s needs at most 5 significant bits and lies in [2^-10, 2688], so it is
exact in bf16, fp16 and float32: the emulated GEMM multiplies these exact
block-scaled operands in the compute dtype (fp32 accumulation) and applies
both global scales to its output, as an FP4 tensor core would.

Gradients are straight-through: the quantizer's derivative is taken as the
identity, so backward runs the two GEMMs of a plain linear in the compute
dtype, on the block-scaled operands the forward used. No gradient is
quantized; the emulation shows the forward's FP4 error, not FP4 backward
GEMMs (which real NVFP4 recipes also run, with extra tricks this does not
model). Non-finite inputs give non-finite outputs, never silent zeros.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 16
FP4_MAX = 6.0
E4M3_MAX = 448.0
E2M1_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoint i lies between codes i and i+1; a tie goes to the even code, so
# it rounds down when i is even and up when i is odd.
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


@dataclass
class NVFP4Tensor:
    """q: (..., K) float32 e2m1 values with sign; scale: (..., K/16) float8_e4m3fn; global_scale: () float32."""
    q: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor

    def block_scaled(self) -> torch.Tensor:
        """q * block scale, float32, (..., K): exact, the GEMM operand."""
        s = self.scale.float().repeat_interleave(BLOCK, dim=-1)
        return self.q * s

    def dequantize(self) -> torch.Tensor:
        return self.block_scaled() * self.global_scale


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value of float32 v, ties to even, saturating at +-6; NaN stays NaN."""
    a = v.abs()
    code = torch.zeros_like(a, dtype=torch.int64)
    for i, m in enumerate(_MIDPOINTS):
        code += (a > m) if i % 2 == 0 else (a >= m)
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=v.device)
    out = grid[code].copysign(v)
    return torch.where(torch.isnan(v), v, out)


def nvfp4_quantize(x: torch.Tensor) -> NVFP4Tensor:
    """Quantize x (..., K) with K a multiple of 16, blocks along the last dim."""
    K = x.shape[-1]
    if K % BLOCK:
        raise ValueError(f"NVFP4 blocks of {BLOCK} need the last dim to be a multiple of {BLOCK}, got {K}")
    xf = x.float()
    amax = xf.abs().amax()
    g = torch.where(amax == 0, torch.ones_like(amax), amax / (FP4_MAX * E4M3_MAX))
    blocks = xf.reshape(*x.shape[:-1], K // BLOCK, BLOCK)
    ratio = (blocks.abs().amax(dim=-1) / FP4_MAX) / g
    scale = ratio.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)
    S = (scale.float() * g).unsqueeze(-1)
    # a zero scale (all-zero or underflowed block) gives q = +-0, keeping the
    # sign; a NaN scale (non-finite input) still makes the block NaN through s
    v = torch.where(S > 0, blocks / S, blocks * 0.0)
    q = round_e2m1(v).reshape(x.shape)
    return NVFP4Tensor(q, scale, g)


def nvfp4_qdq(x: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize: float32 values x passes through NVFP4 as."""
    return nvfp4_quantize(x).dequantize()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# The linear is a pair of opaque custom ops rather than an autograd.Function:
# on CUDA, dynamo traced the Function's backward with a zero gradient in place
# of the real one (aot_eager and inductor alike, torch 2.11, H200), so every
# converted GEMM of a compiled block passed no gradient to its input or its
# weight while its forward stayed exact (benchmarks/nvfp4_lowering_check.py,
# BENCHMARKS.md). Custom ops are not traced into: compile calls them as they
# are, and their backward is the one registered below.
@torch.library.custom_op("megacpp::nvfp4_linear_fwd", mutates_args=())
def _nvfp4_linear_fwd(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = F.linear on NVFP4-rounded inputs; also the block-scaled operands and
    global scales the backward needs: (y, a, b, global_x, global_w)."""
    with torch.autocast(x.device.type, enabled=False):
        qx, qw = nvfp4_quantize(x), nvfp4_quantize(weight)
        a = qx.block_scaled().to(dtype)   # exact in bf16/fp16/fp32
        b = qw.block_scaled().to(dtype)
        gx, gw = qx.global_scale, qw.global_scale
        y = (F.linear(a, b) * (gx * gw)).to(dtype)
    return y, a, b, gx, gw


@_nvfp4_linear_fwd.register_fake
def _(x, weight, dtype):
    f32 = torch.float32
    return (x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype), x.new_empty(x.shape, dtype=dtype),
            weight.new_empty(weight.shape, dtype=dtype), x.new_empty((), dtype=f32), x.new_empty((), dtype=f32))


@torch.library.custom_op("megacpp::nvfp4_linear_bwd", mutates_args=())
def _nvfp4_linear_bwd(grad: torch.Tensor, a: torch.Tensor, b: torch.Tensor, gx: torch.Tensor,
                      gw: torch.Tensor, x_dtype: torch.dtype, w_dtype: torch.dtype
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through gradients: a plain linear's two GEMMs on the forward's operands."""
    g = grad.to(a.dtype)
    with torch.autocast(g.device.type, enabled=False):
        grad_x = ((g @ b) * gw).to(x_dtype)
        g2 = g.reshape(-1, g.shape[-1])
        grad_w = ((g2.t() @ a.reshape(-1, a.shape[-1])) * gx).to(w_dtype)
    return grad_x, grad_w


@_nvfp4_linear_bwd.register_fake
def _(grad, a, b, gx, gw, x_dtype, w_dtype):
    return a.new_empty(a.shape, dtype=x_dtype), b.new_empty(b.shape, dtype=w_dtype)


def _nvfp4_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    _, a, b, gx, gw = output
    ctx.save_for_backward(a, b, gx, gw)
    ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype


def _nvfp4_backward(ctx, grad, *_unused):
    a, b, gx, gw = ctx.saved_tensors
    grad_x, grad_w = torch.ops.megacpp.nvfp4_linear_bwd(grad, a, b, gx, gw, ctx.x_dtype, ctx.w_dtype)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None, None)


_nvfp4_linear_fwd.register_autograd(_nvfp4_backward, setup_context=_nvfp4_setup_context)


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with both inputs NVFP4-rounded (emulated), straight-through gradients."""
    y = torch.ops.megacpp.nvfp4_linear_fwd(x, weight, compute_dtype(x))[0]
    return y if bias is None else y + bias.to(y.dtype)


class NVFP4EmulatedLinear(nn.Linear):
    """An nn.Linear whose forward GEMM sees NVFP4-rounded inputs; same parameters and state dict."""

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "NVFP4EmulatedLinear":
        new = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        new.weight = lin.weight
        new.bias = lin.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nvfp4_linear(x, self.weight, self.bias)


def native_fp4(device: torch.device) -> tuple[bool, str]:
    """Whether this device has FP4 tensor cores, and what the run does about it."""
    if device.type != "cuda":
        return False, f"no FP4 tensor cores on {device.type}: emulated"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 10:
        return False, f"compute capability {major}.{minor} has no FP4 tensor cores (Blackwell, 10.0+, has): emulated"
    return True, (f"compute capability {major}.{minor} has FP4 tensor cores, but megacpp has no native "
                  f"NVFP4 GEMM path yet: emulated")
