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
not nn.Linear and have no low-precision grouped path here: reported kept.
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
GROUPED_REASON = "grouped experts (3-D weights through torch._grouped_mm): no low-precision grouped GEMM path here"


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

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape),
                "decision": "convert" if self.convert else "keep", "reason": self.reason}


def plan_conversion(model: nn.Module, fp32_modules=(), min_gemm_size: int = 0,
                    converted_as: str = "") -> list[GemmDecision]:
    """One decision per GEMM-holding module of `model`, in module order.

    converted_as: the reason text written on converted rows (the backend).
    """
    rows: list[GemmDecision] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            ok, why = linear_decision(name, mod.in_features, mod.out_features,
                                      fp32_modules=fp32_modules, min_gemm_size=min_gemm_size)
            rows.append(GemmDecision(name, "linear", (mod.in_features, mod.out_features), ok,
                                     converted_as if ok else why))
        elif isinstance(mod, nn.Embedding):
            rows.append(GemmDecision(name, "embedding", tuple(mod.weight.shape), False, ROLE_KEEP["embed"]))
        elif isinstance(mod, Experts):
            for pname, p in mod.named_parameters(recurse=False):
                rows.append(GemmDecision(f"{name}.{pname}", "grouped_experts", tuple(p.shape), False,
                                         GROUPED_REASON))
    return rows


def gemm_flops_per_token(g: GemmDecision) -> float:
    """Training FLOPs per token of one nn.Linear GEMM (forward 2*in*out, backward
    twice that); 0 for embeddings and the grouped experts, whose per-token
    work depends on routing and which no recipe here converts."""
    return 6.0 * g.shape[0] * g.shape[1] if g.kind == "linear" else 0.0


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
