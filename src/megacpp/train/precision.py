"""Compute precision: autocast dtype and fp16 dynamic loss scaling."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, spec, device: torch.device):
        self.spec = spec
        self.device = device
        self.dtype = DTYPES[spec.compute]
        if spec.compute == "fp16" and device.type != "cuda":
            # CPU autocast has no fp16 GEMMs worth using; refuse rather than fake it
            from ..errors import MegacppError
            raise MegacppError("policy.precision.compute: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=spec.loss_scale_init,
            growth_interval=spec.loss_scale_growth_interval) if spec.compute == "fp16" else None

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler else loss

    def unscale_(self, optimizers) -> None:
        if self.scaler:
            for o in optimizers:
                if any(p.grad is not None for g in o.param_groups for p in g["params"]):
                    self.scaler.unscale_(o)

    def step(self, optimizers) -> bool:
        """Step each optimizer; returns False when fp16 overflow skipped the step."""
        if not self.scaler:
            for o in optimizers:
                o.step()
            return True
        before = self.scaler.get_scale()
        for o in optimizers:
            self.scaler.step(o)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def describe(self) -> dict:
        return {"compute": self.spec.compute, "params": self.spec.params,
                "low_precision": self.spec.low_precision,
                "fp32_modules": list(self.spec.fp32_modules),
                "loss_scaling": "dynamic" if self.scaler else "none"}
