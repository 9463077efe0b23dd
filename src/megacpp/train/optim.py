"""Optimizers with explicit parameter groups.

No weight decay on norms, biases, embeddings and the SSM/recurrent scalars
(A_log, D, dt_bias); those scalars also stay float32 whatever the model
dtype. Muon (momentum orthogonalised by a Newton-Schulz iteration, Jordan et
al. 2024) optionally takes the hidden 2-D matrices; AdamW takes the rest.
"""
from __future__ import annotations

import torch

NO_DECAY_PARTS = ("norm", "bias", "A_log", "dt_bias", "embed")
FP32_PARTS = ("A_log", "dt_bias")


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    last = name.rsplit(".", 1)[-1]
    return p.ndim < 2 or last in ("D", "A_log", "dt_bias") or any(s in name for s in NO_DECAY_PARTS)


def param_groups(model: torch.nn.Module, weight_decay: float, muon: bool = False):
    """(adamw_groups, muon_params, report) — report lists which group each parameter took."""
    decay, no_decay, muon_params = [], [], []
    report = {"decay": 0, "no_decay": 0, "muon": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden_matrix = p.ndim == 2 and "embed" not in name and not name.startswith("head")
        if muon and hidden_matrix and "router" not in name:
            muon_params.append(p)
            report["muon"] += p.numel()
        elif _no_decay(name, p):
            no_decay.append(p)
            report["no_decay"] += p.numel()
        else:
            decay.append(p)
            report["decay"] += p.numel()
    groups = []
    for params, wd in ((decay, weight_decay), (no_decay, 0.0)):
        # FSDP2 shards (DTensor) and the parameters it replicates go in separate
        # groups: a fused/foreach step cannot mix the two kinds in one call
        for kind in _by_tensor_kind(params):
            groups.append({"params": kind, "weight_decay": wd})
    return groups, muon_params, report


def _by_tensor_kind(params: list) -> list[list]:
    from torch.distributed.tensor import DTensor

    kinds = [[p for p in params if isinstance(p, DTensor)], [p for p in params if not isinstance(p, DTensor)]]
    return [k for k in kinds if k]


def _newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise g (quintic iteration, coefficients from Muon)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return (x.T if transposed else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                buf = st.get("momentum")
                if buf is None:
                    buf = st["momentum"] = torch.zeros_like(p.grad)
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])  # Nesterov
                update = _newton_schulz(update)
                scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)


class Optimizers:
    """AdamW (+ Muon) behind one step/zero_grad/state_dict, with per-group lr scaling."""

    def __init__(self, model: torch.nn.Module, opt_spec, device: torch.device):
        use_muon = opt_spec.name == "muon"
        groups, muon_params, self.report = param_groups(model, opt_spec.weight_decay, use_muon)
        fused = device.type == "cuda"
        self.adamw = torch.optim.AdamW(groups, lr=opt_spec.lr, betas=(opt_spec.beta1, opt_spec.beta2),
                                       eps=opt_spec.eps, fused=fused)
        self.report["adamw_fused"] = fused
        self.muon = Muon(muon_params, lr=opt_spec.muon_lr, momentum=opt_spec.muon_momentum,
                         weight_decay=opt_spec.weight_decay) if muon_params else None
        self.base_lr = opt_spec.lr
        self.muon_lr = opt_spec.muon_lr

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.adamw] + ([self.muon] if self.muon else [])

    def set_lr(self, lr: float) -> None:
        for g in self.adamw.param_groups:
            g["lr"] = lr
        if self.muon:
            for g in self.muon.param_groups:
                g["lr"] = self.muon_lr * lr / self.base_lr

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """set_to_none=False keeps each .grad tensor (zeroed): under CUDA graphs
        (compile.keep_grads_outside_graphs) a None .grad would become a graph buffer."""
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adamw": self.adamw.state_dict(), "muon": self.muon.state_dict() if self.muon else None}

    def load_state_dict(self, state: dict) -> None:
        self.adamw.load_state_dict(state["adamw"])
        if self.muon and state.get("muon"):
            self.muon.load_state_dict(state["muon"])
