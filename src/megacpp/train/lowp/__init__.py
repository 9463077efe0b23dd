"""Low-precision GEMMs of a run: which Linears convert (plan.py), FP8 through
torchao (fp8.py), NVFP4 emulated (nvfp4.py, with its plain oracle in
reference.py). `convert_low_precision` applies policy.precision.low_precision
to a built model and returns the report the manifest prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import MegacppError
from ...model.moe import Experts
from .fp8 import convert_fp8, fp8_unavailable, require_fp8
from .nvfp4 import NVFP4EmulatedLinear, native_fp4, nvfp4_linear, nvfp4_qdq, nvfp4_quantize
from .plan import (GemmDecision, converted_flops_per_token, linear_decision, name_match, plan_conversion,
                   summarize_names)

__all__ = ["LowPrecisionReport", "convert_low_precision", "conversion_plan_summary", "plan_conversion",
           "linear_decision", "name_match", "summarize_names", "GemmDecision", "converted_flops_per_token",
           "fp8_unavailable", "require_fp8", "convert_fp8", "NVFP4EmulatedLinear", "nvfp4_linear",
           "nvfp4_qdq", "nvfp4_quantize", "native_fp4"]

NVFP4_BACKEND = ("megacpp NVFP4 emulation: e2m1 values, 16-element blocks along the reduction dim, "
                 "e4m3 block scales, float32 global scale; forward GEMM inputs only, straight-through gradients")


@dataclass
class LowPrecisionReport:
    recipe: str = "none"
    backend: str = ""
    emulated: bool = False
    native: str = ""              # what the device offers natively, when it matters
    gemms: list[GemmDecision] = field(default_factory=list)
    experts: str = "none"         # policy.precision.expert_low_precision
    experts_backend: str = ""

    @property
    def converted(self) -> list[str]:
        return [g.name for g in self.gemms if g.convert]

    def to_dict(self) -> dict:
        return {"recipe": self.recipe, "backend": self.backend, "emulated": self.emulated,
                "native": self.native, "experts": self.experts, "experts_backend": self.experts_backend,
                "converted": len(self.converted),
                "kept": len(self.gemms) - len(self.converted),
                "converted_flops_per_token": converted_flops_per_token(self.gemms),
                "gemms": [g.to_dict() for g in self.gemms]}


def conversion_plan_summary(recipe) -> dict | None:
    """What policy.precision.low_precision would convert in this recipe's model,
    without building it for real (meta tensors): counts, and the share of the
    model's training FLOPs per token that the converted GEMMs carry. None when
    the recipe converts nothing."""
    import megacpp
    from ...recipe.count import summarize

    spec = recipe.policy.precision
    if spec.low_precision == "none" and spec.expert_low_precision == "none":
        return None
    with torch.device("meta"):
        model = megacpp.build_model(recipe.model)
    plan = plan_conversion(model, spec.fp32_modules, spec.min_gemm_size,
                           converted_as=spec.low_precision, linears=spec.low_precision != "none",
                           experts_as=spec.expert_low_precision if spec.expert_low_precision != "none" else "")
    conv = converted_flops_per_token(plan)
    total = summarize(recipe).flops_per_token
    return {"recipe": spec.low_precision, "experts": spec.expert_low_precision,
            "converted": sum(g.convert for g in plan),
            "kept": sum(not g.convert for g in plan), "converted_flops_per_token": conv,
            "share_of_model_flops": conv / total if total else 0.0}


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _widest_expert_row(model: nn.Module) -> int:
    """The widest row the FP8 grouped GEMMs quantize rowwise: the experts' input
    (d), their gated hidden (up * ffn, the first GEMM's output gradient) and ffn."""
    return max((max(m.w_in.shape[1], m.w_in.shape[2], m.w_out.shape[1])
                for m in model.modules() if isinstance(m, Experts)), default=0)


def convert_low_precision(model: nn.Module, spec, device: torch.device, *, fp8_emulate: bool = False) -> LowPrecisionReport:
    """Apply spec.low_precision (a PrecisionSpec) to `model` in place.

    Call after the model is built and patches are installed, before
    activation checkpointing, compile and distributed wrapping (they wrap
    the converted modules). fp8_emulate is for CPU tests only.
    """
    report = _convert_linears(model, spec, device, fp8_emulate)
    elp = spec.expert_low_precision
    if elp == "none":
        return report
    if elp not in ("fp8_rowwise", "fp8_rowwise_wgrad"):
        raise MegacppError(f"policy.precision.expert_low_precision: unknown value {elp!r}")
    from ...ops.fp8_grouped import BACKEND, BACKEND_WGRAD, fp8_grouped_unavailable, quant_path
    if not fp8_emulate:
        why = fp8_grouped_unavailable(device)
        if why:
            raise MegacppError(f"policy.precision.expert_low_precision={elp}: {why}. "
                               f"Use expert_low_precision=none on this device")
        if spec.compute != "bf16":
            raise MegacppError(f"policy.precision.expert_low_precision={elp} quantizes the experts' bf16 GEMM "
                               f"inputs; policy.precision.compute must be bf16, got {spec.compute}")
    try:
        mode = "emulate" if fp8_emulate else quant_path(device, _widest_expert_row(model))
    except (ValueError, RuntimeError) as e:   # a bad or unrunnable MEGACPP_FP8_QUANT
        raise MegacppError(f"policy.precision.expert_low_precision={elp}: {e}") from None
    backend = ((BACKEND_WGRAD if elp == "fp8_rowwise_wgrad" else BACKEND)
               + (" (emulated in float32)" if fp8_emulate else f"; quantization: {mode}"))
    for mod in model.modules():
        if isinstance(mod, Experts):
            mod.low_precision = f"{elp}:{mode}"
    if not report.gemms:   # low_precision none: the Linears' rows say so
        report.gemms = plan_conversion(model, spec.fp32_modules, spec.min_gemm_size, linears=False)
    report.gemms = [GemmDecision(g.name, g.kind, g.shape, True, backend, g.top_k, elp == "fp8_rowwise_wgrad")
                    if g.kind == "grouped_experts" else g for g in report.gemms]
    report.experts, report.experts_backend = elp, backend
    return report


def _convert_linears(model: nn.Module, spec, device: torch.device, fp8_emulate: bool) -> LowPrecisionReport:
    lp = spec.low_precision
    if lp == "none":
        return LowPrecisionReport()
    if lp in ("fp8_rowwise", "fp8_tensorwise"):
        if not fp8_emulate:
            require_fp8(lp, spec.compute, device)
        plan = plan_conversion(model, spec.fp32_modules, spec.min_gemm_size, converted_as=lp)
        want = {g.name for g in plan if g.convert}
        swapped, backend = convert_fp8(model, lp, want, emulate=fp8_emulate)
        if swapped - want:
            raise MegacppError(f"policy.precision.low_precision={lp}: torchao converted modules outside the "
                               f"plan: {sorted(swapped - want)}")
        # where torchao declined a planned module, say so rather than claim it
        rows = [GemmDecision(g.name, g.kind, g.shape, False, "torchao declined to convert it")
                if g.convert and g.name not in swapped else g for g in plan]
        return LowPrecisionReport(lp, backend, fp8_emulate, "", rows)
    if lp == "nvfp4_emulated":
        plan = plan_conversion(model, spec.fp32_modules, spec.min_gemm_size, converted_as=lp)
        for g in plan:
            if g.convert:
                _replace_module(model, g.name, NVFP4EmulatedLinear.from_linear(model.get_submodule(g.name)))
        return LowPrecisionReport(lp, NVFP4_BACKEND, True, native_fp4(device)[1], plan)
    raise MegacppError(f"policy.precision.low_precision: unknown value {lp!r}")
