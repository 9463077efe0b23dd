"""Mamba mixers: Mamba-2 (SSD) and Mamba-3 SISO, both through ops.ssd.

Mamba-2 (mamba_ssm's Mamba2): in_proj -> [z, x, B, C, dt]; a causal
depthwise conv + SiLU over (x, B, C); dt = softplus(dt + dt_bias),
A = -exp(A_log); y = SSD(x, dt, A, B, C) + D x; gated RMSNorm with z
(per B/C group, gate before norm); out_proj.

Mamba-3 SISO (arXiv 2603.15569): no conv. in_proj -> [z, x, B, C, dt,
lambda, theta]. B and C get RMSNorm then a per-head learned bias (so they
become per-head), then a data-dependent rotation by the cumulative angle
phi_t = sum_{s<=t} dt_s * theta_s (theta: N/2 angles shared by the heads,
dt per head), which makes the real state behave as a complex one. The
exponential-trapezoidal update mixes the current and the previous input:
    h_t = a_t h_{t-1} + b_t B_{t-1} x_{t-1} + c_t B_t x_t,
    a = exp(dt A), b = (1 - lam) dt a, c = lam dt, lam = sigmoid(.).
Both input terms share the decay a_t, so the layer is one SSD call over
2H heads: heads [0, H) carry (lam x_t, B_t), heads [H, 2H) carry
((1 - lam_t) a_t x_{t-1}, B_{t-1}), both read with C_t, and the two halves'
outputs and states add up. Output: per-head RMSNorm, then SiLU(z) gate.

A_log, dt_bias and D are float32 parameters and the decay arithmetic runs
in float32 whatever the activation dtype.

Packed rows: at a document start the op's decay is exp(-1e4) = 0 (ssd's
`starts`: only the log-decay changes, the input term dt x B^T and the skip
D x do not). Mamba-2 passes D to the op; Mamba-3 adds D x itself (its two
halves carry lam x and the previous input, not x). The conv drops taps into the previous document, the
Mamba-3 previous-input term is zeroed at the start, and the rotation angle
restarts at 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# ssd_fast: the Triton scan on CUDA (parity-checked against the reference by
# benchmarks/ssd_kernel_check.py), the pure-torch reference elsewhere.
from ..ops.ssd import ssd_fast as ssd
from ..ops.ssd import ssd_step
from ..recipe.spec import ModelSpec
from . import init as winit
from .context import SeqContext, causal_conv1d, conv_step, conv_tail
from .norm import GatedRMSNorm, RMSNorm, fp
from .rotary import apply_rotary


@dataclass
class Mamba2State:
    conv: torch.Tensor   # (b, K-1, conv_dim) last inputs of the conv
    ssm: torch.Tensor    # (b, H, P, N)


@dataclass
class Mamba3State:
    ssm: torch.Tensor     # (b, H, P, N)
    phi: torch.Tensor     # (b, H, N/2) cumulative rotation angle through the last token (float64)
    prev_x: torch.Tensor  # (b, H, P) last token's x
    prev_B: torch.Tensor  # (b, H, N) last token's rotated, biased B


def _shift_right(t: torch.Tensor) -> torch.Tensor:
    """t[:, i] -> t[:, i-1] along dim 1, zeros at i = 0."""
    return F.pad(t, (0,) * (2 * (t.dim() - 2)) + (1, 0))[:, :-1]


def segmented_cumsum(v: torch.Tensor, starts: torch.Tensor | None) -> torch.Tensor:
    """Cumulative sum over dim 1 in float64, restarting at document starts. v (b, t, ...)."""
    cs = v.double().cumsum(dim=1)
    if starts is None:
        return cs
    b, t = starts.shape
    idx = torch.arange(t, device=v.device).expand(b, t)
    # index of the token before each token's document start (-1: none)
    before = torch.where(starts, idx - 1, torch.full_like(idx, -1)).cummax(dim=1).values
    shape = (b, t) + (1,) * (v.dim() - 2)
    gathered = torch.gather(cs, 1, before.clamp(min=0).view(shape).expand_as(cs))
    return cs - torch.where((before >= 0).view(shape), gathered, torch.zeros_like(gathered))


class _MambaBase(nn.Module):
    # run policy, not identity (policy.kernels.ssd_states, set by
    # train.activation.apply_ssd_states): keep the Triton scan's chunk
    # states from forward to backward instead of recomputing them
    keep_ssd_states: bool = False

    def _init_sizes(self, spec: ModelSpec) -> None:
        m = spec.mamba
        self.d_inner, self.heads, self.head_dim = spec.mamba_d_inner, spec.mamba_heads, m.head_dim
        self.groups, self.state_dim, self.chunk_size = m.num_groups, m.state_dim, m.chunk_size
        self.dt_min, self.dt_max = m.dt_min, m.dt_max

    def _init_ssm_params(self, spec: ModelSpec) -> None:
        H = self.heads
        self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(H, dtype=torch.float32))

    def _reset_ssm_params(self) -> None:
        winit.a_log_(self.A_log)
        winit.dt_bias_(self.dt_bias, self.dt_min, self.dt_max)
        with torch.no_grad():
            self.D.fill_(1.0)

    def _dt_A(self, dt_raw):
        dt_raw = fp(dt_raw)
        dt = F.softplus(dt_raw + self.dt_bias.to(dt_raw.dtype))
        return dt, -torch.exp(self.A_log.to(dt.dtype))


class Mamba2(_MambaBase):
    # run policy, not identity (policy.kernels.mamba_in_proj, set by
    # train.activation.apply_mamba_in_proj): in_proj as three GEMMs over row
    # slices of its weight instead of one GEMM and a split
    split_in_proj: bool = False

    def __init__(self, spec: ModelSpec):
        super().__init__()
        m, d = spec.mamba, spec.hidden_size
        self._init_sizes(spec)
        self.conv_dim = self.d_inner + 2 * self.groups * self.state_dim
        self.in_proj = nn.Linear(d, self.d_inner + self.conv_dim + self.heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, m.conv_width, groups=self.conv_dim, bias=True)
        self._init_ssm_params(spec)
        self.norm = GatedRMSNorm(self.d_inner, spec.norm.eps, group_size=self.d_inner // self.groups,
                                 norm_before_gate=False)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        winit.normal_(self.in_proj.weight, std)
        winit.conv_default_(self.conv1d)
        self._reset_ssm_params()
        self.norm.reset_parameters()
        winit.normal_(self.out_proj.weight, out_std)

    def _split(self, zxbcdt):
        return zxbcdt.split([self.d_inner, self.conv_dim, self.heads], dim=-1)

    @property
    def runs_split(self) -> bool:
        """Whether forward takes the split. Not where FSDP2 shards in_proj as a
        group of its own (policy.parallel.gather = "compute_subgroups"): its
        all-gather hook fires only when the module itself is called."""
        from torch.distributed.fsdp import FSDPModule
        return self.split_in_proj and not isinstance(self.in_proj, FSDPModule)

    def _project(self, u):
        """(z, xBC, dt) from in_proj: one GEMM then a split, or three GEMMs over
        the weight's row slices (views: no copy), whose backward takes dz, dxBC
        and ddt as they come instead of concatenating them for one GEMM."""
        if not self.runs_split:
            return self._split(self.in_proj(u))
        w = self.in_proj.weight
        a, b = self.d_inner, self.d_inner + self.conv_dim
        return F.linear(u, w[:a]), F.linear(u, w[a:b]), F.linear(u, w[b:])

    def _xbc(self, xbc):
        GN = self.groups * self.state_dim
        x, B, C = xbc.split([self.d_inner, GN, GN], dim=-1)
        lead = x.shape[:-1]
        return (x.reshape(*lead, self.heads, self.head_dim),
                B.reshape(*lead, self.groups, self.state_dim),
                C.reshape(*lead, self.groups, self.state_dim))

    def forward(self, u: torch.Tensor, ctx: SeqContext):
        b, t, _ = u.shape
        z, xbc_in, dt_raw = self._project(u)
        xbc = causal_conv1d(xbc_in, self.conv1d.weight, self.conv1d.bias, ctx, activation="silu")
        x, B, C = self._xbc(xbc)
        dt, A = self._dt_A(dt_raw)
        # the skip term D x and the document resets inside the op (nothing rescaled here)
        y, final = ssd(x, dt, A, B, C, self.chunk_size, D=self.D, starts=ctx.starts,
                       keep_states=self.keep_ssd_states)
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        state = None
        if ctx.want_state:
            state = Mamba2State(conv_tail(xbc_in, self.conv1d.weight.shape[-1]).detach(), final.detach())
        return self.out_proj(y), None, state

    def step(self, u: torch.Tensor, state: Mamba2State):
        b = u.shape[0]
        z, xbc_in, dt_raw = self._split(self.in_proj(u))
        xbc, conv = conv_step(xbc_in, state.conv, self.conv1d.weight, self.conv1d.bias)
        x, B, C = self._xbc(F.silu(xbc))
        dt, A = self._dt_A(dt_raw)
        y, ssm = ssd_step(state.ssm, x, dt, A, B, C, self.D)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return self.out_proj(y), Mamba2State(conv, ssm)


class Mamba3(_MambaBase):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        m, d = spec.mamba, spec.hidden_size
        self._init_sizes(spec)
        self.angles = self.state_dim // 2
        GN = self.groups * self.state_dim
        self.split_sizes = [self.d_inner, self.d_inner, GN, GN, self.heads, self.heads, self.angles]
        self.in_proj = nn.Linear(d, sum(self.split_sizes), bias=False)
        self.B_norm = RMSNorm(self.state_dim, spec.norm.eps)
        self.C_norm = RMSNorm(self.state_dim, spec.norm.eps)
        self.B_bias = nn.Parameter(torch.empty(self.heads, self.state_dim))
        self.C_bias = nn.Parameter(torch.empty(self.heads, self.state_dim))
        self._init_ssm_params(spec)
        self.norm = GatedRMSNorm(self.d_inner, spec.norm.eps, group_size=self.head_dim, norm_before_gate=True)
        self.out_proj = nn.Linear(self.d_inner, d, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        winit.normal_(self.in_proj.weight, std)
        self.B_norm.reset_parameters()
        self.C_norm.reset_parameters()
        with torch.no_grad():
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
        self._reset_ssm_params()
        self.norm.reset_parameters()
        winit.normal_(self.out_proj.weight, out_std)

    def _prep(self, u):
        """Shared projections: everything but the rotation. Works on (b, t, d) or (b, d)."""
        z, x, B, C, dt_raw, lam_raw, theta = self.in_proj(u).split(self.split_sizes, dim=-1)
        lead = x.shape[:-1]
        x = x.reshape(*lead, self.heads, self.head_dim)
        rep = self.heads // self.groups
        # group g serves heads [g*rep, (g+1)*rep), as in ops.ssd
        B = self.B_norm(B.reshape(*lead, self.groups, self.state_dim)).repeat_interleave(rep, dim=-2)
        C = self.C_norm(C.reshape(*lead, self.groups, self.state_dim)).repeat_interleave(rep, dim=-2)
        B = B + self.B_bias.to(B.dtype)
        C = C + self.C_bias.to(C.dtype)
        dt, A = self._dt_A(dt_raw)
        lam = torch.sigmoid(fp(lam_raw))
        dphi = dt[..., None] * fp(theta)[..., None, :]  # (..., H, N/2)
        return z, x, B, C, dt, A, lam, dphi

    @staticmethod
    def _rotate(v, phi):
        return apply_rotary(v, torch.cos(phi), torch.sin(phi))

    def forward(self, u: torch.Tensor, ctx: SeqContext):
        b, t, _ = u.shape
        H = self.heads
        z, x, B, C, dt, A, lam, dphi = self._prep(u)
        starts = ctx.starts
        phi = segmented_cumsum(dphi, starts)
        B, C = self._rotate(B, phi), self._rotate(C, phi)
        alpha = torch.exp(dt * A)
        x_prev, B_prev = _shift_right(x), _shift_right(B)
        prev_scale = (1.0 - lam) * alpha
        if starts is not None:
            prev_scale = prev_scale.masked_fill(starts[..., None], 0.0)
        xx = torch.cat([x * lam[..., None].to(x.dtype), x_prev * prev_scale[..., None].to(x.dtype)], dim=2)
        y2, s2 = ssd(xx, torch.cat([dt, dt], dim=2), torch.cat([A, A]),
                     torch.cat([B, B_prev], dim=2), torch.cat([C, C], dim=2),
                     self.chunk_size, starts=starts, keep_states=self.keep_ssd_states)
        y = y2[:, :, :H] + y2[:, :, H:] + x * self.D.to(x.dtype)[:, None]
        y = self.norm(y.reshape(b, t, self.d_inner), z)
        state = None
        if ctx.want_state:
            state = Mamba3State((s2[:, :H] + s2[:, H:]).detach(), phi[:, -1].detach(),
                                x[:, -1].detach(), B[:, -1].detach())
        return self.out_proj(y), None, state

    def step(self, u: torch.Tensor, state: Mamba3State):
        b = u.shape[0]
        H = self.heads
        z, x, B, C, dt, A, lam, dphi = self._prep(u)
        phi = state.phi + dphi.double()
        B, C = self._rotate(B, phi), self._rotate(C, phi)
        alpha = torch.exp(dt * A)
        xx = torch.cat([x * lam[..., None].to(x.dtype),
                        state.prev_x * ((1.0 - lam) * alpha)[..., None].to(x.dtype)], dim=1)
        ss = torch.cat([state.ssm, torch.zeros_like(state.ssm)], dim=1)
        y2, s2 = ssd_step(ss, xx, torch.cat([dt, dt], dim=1), torch.cat([A, A]),
                          torch.cat([B, state.prev_B], dim=1), torch.cat([C, C], dim=1))
        y = y2[:, :H] + y2[:, H:] + x * self.D.to(x.dtype)[:, None]
        y = self.norm(y.reshape(b, self.d_inner), z)
        return self.out_proj(y), Mamba3State(s2[:, :H] + s2[:, H:], phi, x, B)


def build_mamba(spec: ModelSpec) -> nn.Module:
    v = spec.mamba.version
    if v == 2:
        return Mamba2(spec)
    if v == 3:
        return Mamba3(spec)
    raise ValueError(f"unknown Mamba version {v!r} (2 | 3)")
