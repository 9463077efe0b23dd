"""Run precision: compute (autocast) dtype, parameter storage dtype, fp16
dynamic loss scaling, and the low-precision GEMM conversion (train/lowp/).

policy.precision.params=bf16 stores every parameter in bf16 except those
whose name matches fp32_modules (SSM A_log, D, dt_bias, norms, routers):
those small tensors set decay rates, skip gains and routing choices, where
bf16's 8-bit mantissa visibly changes the function. There are no float32
master copies: the optimizer updates bf16 weights and keeps its state in
the parameter's dtype. It runs with compute=bf16 only, so every GEMM sees
one dtype.
"""
from __future__ import annotations

import contextlib

import torch

from ..errors import MegacppError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_scaler(spec, device: torch.device) -> torch.amp.GradScaler:
    """fp16 dynamic loss scaling: halve on overflow (step skipped), double after
    loss_scale_growth_interval clean steps."""
    return torch.amp.GradScaler(device.type, init_scale=spec.loss_scale_init,
                                growth_interval=spec.loss_scale_growth_interval)


def cast_parameters(model: torch.nn.Module, spec) -> dict:
    """Store parameters in spec.params, keeping fp32_modules in float32.

    Returns the manifest's view: numel per dtype and the float32-kept
    parameter names (layer indices collapsed, with counts).
    """
    from .lowp.plan import name_match, summarize_names

    target = DTYPES[spec.params]
    kept = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name_match(name, spec.fp32_modules) is not None:
                if p.dtype != torch.float32:
                    p.data = p.data.float()
                kept.append(name)
            elif p.dtype != target and p.is_floating_point():
                p.data = p.data.to(target)
    numel: dict[str, int] = {}
    for p in model.parameters():
        key = str(p.dtype).removeprefix("torch.")
        numel[key] = numel.get(key, 0) + p.numel()
    return {"numel_by_dtype": numel, "float32_kept": summarize_names(kept)}


class Precision:
    def __init__(self, spec, device: torch.device):
        self.spec = spec
        self.device = device
        self.dtype = DTYPES[spec.compute]
        if spec.compute == "fp16" and device.type != "cuda":
            # CPU autocast has no fp16 GEMMs worth using; refuse rather than fake it
            raise MegacppError("policy.precision.compute: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
        if spec.params == "bf16" and spec.compute != "bf16":
            raise MegacppError(f"policy.precision.params=bf16 needs policy.precision.compute=bf16 "
                               f"(got {spec.compute}): with other compute dtypes bf16 weights meet "
                               f"{spec.compute} activations in the same GEMM")
        self.scaler = make_scaler(spec, device) if spec.compute == "fp16" else None
        if device.type == "cuda":
            # process-wide switches: the recipe, not a library default, decides them
            tf32 = spec.fp32_matmul == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
        self.residual_dtype = self.dtype if spec.residual == "compute" and self.dtype != torch.float32 else None
        self.params_report: dict | None = None
        self.lowp = None

    def apply(self, model: torch.nn.Module) -> None:
        """Parameter dtypes, then the low-precision GEMM conversion, in place.

        After the model is built and patches installed; before activation
        checkpointing, compile, wrapping and the optimizer (which must see
        the final parameters). What it did goes into describe().
        """
        from .lowp import convert_low_precision

        self.params_report = cast_parameters(model, self.spec)
        if hasattr(model, "residual_dtype"):
            # "compute": the stream between layers in the autocast dtype (fp32 compute: no change)
            model.residual_dtype = self.residual_dtype
        self.lowp = convert_low_precision(model, self.spec, self.device)

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
        """Step each optimizer; returns False when fp16 overflow skipped the step.

        GradScaler skips an optimizer whose gradients hold an inf/NaN and
        then backs the scale off, so a smaller scale afterwards is the sign
        of a skipped step.
        """
        if not self.scaler:
            for o in optimizers:
                o.step()
            return True
        before = self.scaler.get_scale()
        for o in optimizers:
            self.scaler.step(o)
        self.scaler.update()
        return self.scaler.get_scale() >= before

    def skip_step(self) -> None:
        """The caller skipped this step (non-finite loss or gradient): back the
        scale off as an overflow does and restart the count of clean steps."""
        if not self.scaler:
            return
        s = self.scaler
        s.update(s.get_scale() * s.get_backoff_factor())  # also clears this step's unscale records
        state = s.state_dict()
        state["_growth_tracker"] = 0
        s.load_state_dict(state)

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler else None}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def describe(self) -> dict:
        sp = self.spec
        out = {"compute": sp.compute, "params": sp.params,
               "residual": str(self.residual_dtype or torch.float32).removeprefix("torch."),
               "low_precision": sp.low_precision,
               "expert_low_precision": sp.expert_low_precision,
               "fp32_matmul": sp.fp32_matmul if self.device.type == "cuda" else "ieee (cpu)",
               "fp32_modules": list(sp.fp32_modules), "min_gemm_size": sp.min_gemm_size,
               "loss_scaling": "dynamic" if self.scaler else "none"}
        if self.scaler:
            out["loss_scale"] = {"init": sp.loss_scale_init, "growth_interval": sp.loss_scale_growth_interval,
                                 "current": self.scaler.get_scale()}
        if self.params_report is not None:
            out["parameters"] = self.params_report
        if self.lowp is not None:
            out["gemms"] = self.lowp.to_dict()
        return out
