"""Recurrent mixer R: Gated DeltaNet (Yang, Kautz, Hatamizadeh; fla's layer).

q, k, v projections -> short causal depthwise conv + SiLU each ->
L2-normalised q and k per head -> gated delta rule through
ops.delta_rule (q scaled by dk^-0.5 inside the op):
    S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T,  o_t = S_t^T q_t
with beta = sigmoid(b_proj x) and log-decay g = -exp(A_log) softplus(a_proj x + dt_bias)
(a Mamba-2-style decay per head). The output is RMS-normalised per head,
gated by SiLU(g_proj x), and projected back by o_proj.

Packed rows: g is forced to -1e4 (exp = 0) at document starts, so neither
the state nor the delta-rule correction carries anything across, and the
convs drop taps into the previous document.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.delta_rule import gated_delta_rule_fast
from ..ops.delta_rule.reference import gated_delta_rule_step
from ..recipe.spec import ModelSpec
from . import init as winit
from .context import SeqContext, causal_conv1d, conv_step, conv_tail, reset_log_decay
from .norm import GatedRMSNorm, fp
from .projections import project

# fla's GatedDeltaNet draws dt for the decay's bias from this range.
DT_MIN, DT_MAX = 0.001, 0.1


@dataclass
class RecurrentState:
    conv_q: torch.Tensor  # (b, K-1, H*dk) last pre-conv inputs
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    S: torch.Tensor       # (b, H, dk, dv)


class GatedDeltaNet(nn.Module):
    # run policy, not identity (policy.kernels.delta_states, set by
    # train.activation.apply_delta_states): keep the Triton kernels'
    # intermediates from forward to backward instead of recomputing them
    keep_delta_states: bool = False

    def __init__(self, spec: ModelSpec):
        super().__init__()
        r, d = spec.recurrent, spec.hidden_size
        self.heads, self.dk, self.dv = r.num_heads, r.key_dim, r.value_dim
        self.chunk_size, self.conv_width = r.chunk_size, r.conv_width
        H, dk, dv, K = self.heads, self.dk, self.dv, r.conv_width
        self.q_proj = nn.Linear(d, H * dk, bias=False)
        self.k_proj = nn.Linear(d, H * dk, bias=False)
        self.v_proj = nn.Linear(d, H * dv, bias=False)
        self.q_conv = nn.Conv1d(H * dk, H * dk, K, groups=H * dk, bias=False)
        self.k_conv = nn.Conv1d(H * dk, H * dk, K, groups=H * dk, bias=False)
        self.v_conv = nn.Conv1d(H * dv, H * dv, K, groups=H * dv, bias=False)
        self.a_proj = nn.Linear(d, H, bias=False)
        self.b_proj = nn.Linear(d, H, bias=False)
        self.A_log = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(H, dtype=torch.float32))
        self.g_proj = nn.Linear(d, H * dv, bias=False)
        self.o_norm = GatedRMSNorm(dv, spec.norm.eps, norm_before_gate=True)
        self.o_proj = nn.Linear(H * dv, d, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj):
            winit.normal_(lin.weight, std)
        for conv in (self.q_conv, self.k_conv, self.v_conv):
            winit.conv_default_(conv)
        winit.a_log_(self.A_log)
        winit.dt_bias_(self.dt_bias, DT_MIN, DT_MAX)
        self.o_norm.reset_parameters()
        winit.normal_(self.o_proj.weight, out_std)

    def _project(self, x):
        """q, k, v (before their convs), a, b (gate rows) and the output gate: one GEMM."""
        return project(x, self.q_proj, self.k_proj, self.v_proj, self.a_proj, self.b_proj, self.g_proj)

    def _gates(self, a, b):
        a = fp(a)
        g = -torch.exp(self.A_log.to(a.dtype)) * F.softplus(a + self.dt_bias.to(a.dtype))
        beta = torch.sigmoid(fp(b))
        return g, beta

    def _heads(self, q, k, v):
        lead = q.shape[:-1]
        q = F.normalize(fp(q.reshape(*lead, self.heads, self.dk)), dim=-1, eps=1e-6).to(q.dtype)
        k = F.normalize(fp(k.reshape(*lead, self.heads, self.dk)), dim=-1, eps=1e-6).to(k.dtype)
        return q, k, v.reshape(*lead, self.heads, self.dv)

    def _out(self, o, gate):
        lead = o.shape[:-2]
        gate = gate.reshape(*lead, self.heads, self.dv)
        return self.o_proj(self.o_norm(o, gate).reshape(*lead, self.heads * self.dv))

    def forward(self, x: torch.Tensor, ctx: SeqContext):
        qi, ki, vi, ai, bi, gate = self._project(x)
        q = causal_conv1d(qi, self.q_conv.weight, None, ctx, activation="silu")
        k = causal_conv1d(ki, self.k_conv.weight, None, ctx, activation="silu")
        v = causal_conv1d(vi, self.v_conv.weight, None, ctx, activation="silu")
        q, k, v = self._heads(q, k, v)
        g, beta = self._gates(ai, bi)
        g = reset_log_decay(g, ctx)
        # the dispatcher: fla's or the project's Triton kernels on CUDA, the
        # reference elsewhere (the run's manifest records which)
        o, S = gated_delta_rule_fast(q, k, v, g, beta, chunk_size=self.chunk_size,
                                     keep_states=self.keep_delta_states)
        state = None
        if ctx.want_state:
            K = self.conv_width
            state = RecurrentState(conv_tail(qi, K).detach(), conv_tail(ki, K).detach(),
                                   conv_tail(vi, K).detach(), S.detach())
        return self._out(o, gate), None, state

    def step(self, x: torch.Tensor, state: RecurrentState):
        qi, ki, vi, ai, bi, gate = self._project(x)
        q, cq = conv_step(qi, state.conv_q, self.q_conv.weight, None)
        k, ck = conv_step(ki, state.conv_k, self.k_conv.weight, None)
        v, cv = conv_step(vi, state.conv_v, self.v_conv.weight, None)
        q, k, v = self._heads(F.silu(q), F.silu(k), F.silu(v))
        g, beta = self._gates(ai, bi)
        o, S = gated_delta_rule_step(state.S, q, k, v, g, beta)
        return self._out(o, gate), RecurrentState(cq, ck, cv, S)


def build_recurrent(spec: ModelSpec) -> nn.Module:
    if spec.recurrent.kind == "gated_deltanet":
        return GatedDeltaNet(spec)
    raise ValueError(f"unknown recurrent kind {spec.recurrent.kind!r} (gated_deltanet)")
