"""Which GEMMs a low-precision recipe converts, and why every other one is kept.

The decision for one nn.Linear is a pure function of its qualified name and
shape (`linear_decision`), so the rule is testable without a model and its
result is printed in the run manifest, one row per GEMM (`plan_conversion`).

Rules, first match wins:
  1. always kept by role: the output head (its GEMM runs inside the loss
     path, through model.head_weight, never through the module), embeddings
     (a lookup, not a GEMM) and routers (top-k choices flip under
     low-precision scores; the router also computes in float32);
  2. kept because the name matches policy.precision.fp32_modules;
  3. kept when in_features * out_features < policy.precision.min_gemm_size:
     the cast and scale work outweigh the faster GEMM on small matrices;
  4. kept when a dimension is not a multiple of 16: the FP8 GEMM kernels
     need 16-aligned dims, and NVFP4 scales blocks of 16 along the
     reduction dim;
  5. otherwise converted.
The stacked MoE experts (3-D `w_in`, `w_out` through torch._grouped_mm) are
not nn.Linear: low_precision leaves them alone; policy.precision.
expert_low_precision = "fp8_rowwise" converts them (ops.fp8_grouped: forward
and input gradient in FP8, the weight gradient bf16), "fp8_rowwise_wgrad"
the weight gradient too.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ...model.moe import Experts

ALIGN = 16
# Name parts kept whatever the recipe says, with the reason printed for each.
ROLE_KEEP = {
    "head": "output head: its GEMM runs in the loss path (model.head_weight), not through this module",
    "embed": "embedding: a lookup, not a GEMM",
    "router": "router: top-k choices are discrete and flip under low-precision scores",
}
GROUPED_REASON = ("grouped experts (3-D weights through torch._grouped_mm): policy.precision.expert_low_precision "
                  "is none")


def name_match(name: str, keys) -> str | None:
    """The first key that some dotted part of `name` ends with, else None.

    Suffix matching lets "norm" cover kv_norm, final_norm and the MTP hnorm,
    while "D" still matches only a part that is exactly or ends in "D"
    (Mamba's skip parameter), never a part that merely contains it.
    """
    parts = name.split(".")
    for key in keys:
        if any(p.endswith(key) for p in parts):
            return key
    return None


def linear_decision(name: str, in_features: int, out_features: int, *,
                    fp32_modules=(), min_gemm_size: int = 0) -> tuple[bool, str]:
    """(convert?, reason) for one nn.Linear; see the module docstring for the rules."""
    role = name_match(name, ROLE_KEEP)
    if role is not None:
        return False, ROLE_KEEP[role]
    key = name_match(name, fp32_modules)
    if key is not None:
        return False, f"float32 module (policy.precision.fp32_modules matches {key!r})"
    size = in_features * out_features
    if size < min_gemm_size:
        return False, f"small GEMM: in*out = {size} < policy.precision.min_gemm_size {min_gemm_size}"
    if in_features % ALIGN or out_features % ALIGN:
        return False, (f"dims not multiples of {ALIGN} (in {in_features}, out {out_features}): "
                       f"the FP8/FP4 GEMM kernels need them")
    return True, ""


@dataclass(frozen=True)
class GemmDecision:
    name: str
    kind: str                 # linear | grouped_experts | embedding
    shape: tuple[int, ...]    # linear: (in, out); grouped: the weight's shape; embedding: (vocab, d)
    convert: bool
    reason: str
    top_k: int = 0            # grouped experts: expert rows per token (their GEMMs' share per token)
    wgrad: bool = False       # grouped experts: the weight gradient converted too (fp8_rowwise_wgrad)

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "decision": "convert" if self.convert else "keep", "reason": self.reason}


LINEARS_KEPT = "policy.precision.low_precision is none"


def plan_conversion(model: nn.Module, fp32_modules=(), min_gemm_size: int = 0,
                    converted_as: str = "", experts_as: str = "", linears: bool = True) -> list[GemmDecision]:
    """One decision per GEMM-holding module of `model`, in module order.

    converted_as: the reason text written on converted nn.Linear rows (the
    backend); linears=False keeps every Linear (low_precision none). experts_as:
    the same text for the grouped experts; "" keeps them.
    """
    rows: list[GemmDecision] = []
    top_k: dict[str, int] = {}   # experts module name -> its MoE's top_k
    for name, mod in model.named_modules():
        if isinstance(getattr(mod, "experts", None), Experts) and hasattr(mod, "top_k"):
            top_k[f"{name}.experts" if name else "experts"] = int(mod.top_k)
        if isinstance(mod, nn.Linear):
            ok, why = linear_decision(name, mod.in_features, mod.out_features,
                                      fp32_modules=fp32_modules, min_gemm_size=min_gemm_size)
            if ok and not linears:
                ok, why = False, LINEARS_KEPT
            rows.append(GemmDecision(name, "linear", (mod.in_features, mod.out_features), ok,
                                     converted_as if ok else why))
        elif isinstance(mod, nn.Embedding):
            rows.append(GemmDecision(name, "embedding", tuple(mod.weight.shape), False, ROLE_KEEP["embed"]))
        elif isinstance(mod, Experts):
            for pname, p in mod.named_parameters(recurse=False):
                rows.append(GemmDecision(f"{name}.{pname}", "grouped_experts", tuple(p.shape), bool(experts_as),
                                         experts_as or GROUPED_REASON, top_k.get(name, 0),
                                         wgrad=experts_as == "fp8_rowwise_wgrad"))
    return rows


def gemm_flops_per_token(g: GemmDecision) -> float:
    """Training FLOPs per token of one GEMM that a recipe converts: an nn.Linear's
    forward 2*in*out and backward twice that; a grouped expert weight's
    forward and input gradient (4*in*out per expert row, top_k rows a token),
    and its weight gradient (2*in*out more) where that is converted too; 0 for
    embeddings."""
    if g.kind == "linear":
        return 6.0 * g.shape[0] * g.shape[1]
    if g.kind == "grouped_experts":
        return (6.0 if g.wgrad else 4.0) * g.shape[-2] * g.shape[-1] * g.top_k
    return 0.0


def converted_flops_per_token(gemms: list[GemmDecision]) -> float:
    """The training FLOPs per token that run through converted GEMMs: the
    most a low-precision recipe can speed up (Amdahl's numerator)."""
    return sum(gemm_flops_per_token(g) for g in gemms if g.convert)


def summarize_names(names) -> dict[str, int]:
    """Collapse layer indices ("layers.3.norm.weight" -> "layers.*.norm.weight") and count."""
    out: dict[str, int] = {}
    for n in names:
        key = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", n)
        out[key] = out.get(key, 0) + 1
    return out
