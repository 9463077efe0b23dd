"""Pins down torch._scaled_grouped_mm's 2d x 2d case (groups along the reduction
dim: the experts' weight gradient dW[e] = X_e^T G_e) on this card: which operand
layouts and scale shapes it takes, whether group ends must be 16-aligned, and its
error against the dequantized float32 product. Prints one line per attempt."""
from __future__ import annotations

import torch

dev = torch.device("cuda")
torch.manual_seed(0)
E, K, N = 4, 256, 384
counts = [64, 32, 96, 48]                     # multiples of 16
ends = torch.tensor(counts, device=dev).cumsum(0).to(torch.int32)
M = int(ends[-1])
x = torch.randn(M, K, device=dev)
g = torch.randn(M, N, device=dev)
f8 = torch.float8_e4m3fn


def quant_cols(t, ends):
    """Per group, per column scales (amax over the group's rows), e4m3 values."""
    q = torch.empty_like(t, dtype=f8)
    scales = []
    start = 0
    for end in ends.tolist():
        seg = t[start:end]
        s = seg.abs().amax(0).clamp_min(1e-12) / 448.0
        q[start:end] = (seg / s).to(f8)
        scales.append(s)
        start = end
    return q, torch.stack(scales)               # (M, C), (E, C)


xq, xs = quant_cols(x, ends)
gq, gs = quant_cols(g, ends)
ref = []
start = 0
for e, end in enumerate(ends.tolist()):
    ref.append((xq[start:end].float() * xs[e]).t() @ (gq[start:end].float() * gs[e]))
    start = end
ref = torch.stack(ref)                          # (E, K, N)

a = xq.t().contiguous()                         # (K, M) row-major
b = gq.t().contiguous().t()                     # (M, N) column-major
for name, sa, sb in [("flat (E*K,), (E*N,)", xs.reshape(-1), gs.reshape(-1)),
                     ("2d (E, K), (E, N)", xs, gs)]:
    try:
        out = torch._scaled_grouped_mm(a, b, sa.contiguous(), sb.contiguous(), offs=ends, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"2d x 2d, scales {name}: out {tuple(out.shape)} {out.dtype}, rel err {err:.2e}")
    except Exception as e:  # noqa: BLE001 - a probe: every refusal is the answer
        print(f"2d x 2d, scales {name}: refused: {str(e).splitlines()[0][:200]}")
try:
    bad = torch.tensor([60, 100, 200, 240], device=dev, dtype=torch.int32)
    torch._scaled_grouped_mm(a, b, xs.reshape(-1), gs.reshape(-1), offs=bad, out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    print("unaligned group ends (60, 100, 200, 240): accepted")
except Exception as e:  # noqa: BLE001
    print(f"unaligned group ends: refused: {str(e).splitlines()[0][:200]}")
try:
    out = torch._scaled_grouped_mm(a, gq, xs.reshape(-1), gs.reshape(-1), offs=ends, out_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    print("row-major right operand: accepted")
except Exception as e:  # noqa: BLE001
    print(f"row-major right operand: refused: {str(e).splitlines()[0][:200]}")
print(torch.__version__, torch.cuda.get_device_name(dev))
