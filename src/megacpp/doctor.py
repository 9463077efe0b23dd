"""`megacpp doctor`: which fast paths run on this machine, and why not.

One row per hot path: the backend a run would take here and the reason for
each one it cannot take (no CUDA, library missing, version refused, not
built in this version). The same facts a run records in its manifest.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil

import torch


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def _kernel_row(path: str, title: str, reason, fast: str, reference: str) -> dict:
    """One op's row: its Triton kernels when `reason()` is '' (a bad MEGACPP_... value reads as the reason)."""
    try:
        why = reason()
    except ValueError as e:
        why = str(e)
    return {"path": path, "runs": reference if why else fast, "why_not": f"{title}: {why}" if why else ""}


def rows(device: torch.device) -> list[dict]:
    from .model.moe import grouped_mm_available
    from .patches.registry import all_patches

    cuda = device.type == "cuda"
    cap = torch.cuda.get_device_capability(device) if cuda else None
    tri = _triton()
    out = []

    for name, patch in all_patches().items():
        backs = patch.backends(device)
        best = next((b for b in backs if b.available), None)
        out.append({"path": f"patch {name}", "runs": best.name if best else "plain path",
                    "why_not": "; ".join(f"{b.name}: {b.reason}" for b in backs if not b.available)})

    from .ops.causal_conv import conv_backend_reason
    from .ops.ssd import ssd_backend_reason
    dt = torch.bfloat16 if cuda else None
    out.append(_kernel_row("SSD scan (Mamba-2/3)", "Triton SSD", lambda: ssd_backend_reason(device, dt),
                           "Triton chunked scan (ops.ssd.triton_ssd)", "chunked pure-torch reference (ops.ssd)"))
    out.append(_kernel_row("short causal conv (M, R)", "Triton conv", lambda: conv_backend_reason(device, dt),
                           "Triton conv, SiLU fused (ops.causal_conv.triton_conv)",
                           "pure-torch reference (ops.causal_conv)"))
    from .ops.gated_norm import gated_norm_backend_reason
    from .ops.gated_norm.dispatch import WIDE_GROUP
    out.append(_kernel_row("gated RMSNorm (M, R outputs)", "Triton gated norm",
                           lambda: gated_norm_backend_reason(device, dt),
                           (f"Triton one-pass forward and backward for groups of up to {WIDE_GROUP} channels (R heads); "
                            "wider groups (M) take the compiled reference (ops.gated_norm)"),
                           "pure-torch reference (ops.gated_norm)"))
    from .ops.swiglu import swiglu_backend_reason
    out.append(_kernel_row("SwiGLU (F, E layers)", "Triton SwiGLU", lambda: swiglu_backend_reason(device, dt),
                           "Triton one-pass forward and backward (ops.swiglu.triton_swiglu)",
                           "pure-torch reference, compiled by inductor in a run (ops.swiglu)"))
    from .ops.delta_rule.dispatch import fla_reason
    try:
        why = fla_reason(device)
    except ValueError as e:  # a bad MEGACPP_DELTA_RULE value (reported below too)
        why = str(e)
    from .ops.delta_rule import delta_rule_backend_reason
    try:
        gdr_why = delta_rule_backend_reason(device, torch.bfloat16 if cuda else None)
    except ValueError as e:  # a bad MEGACPP_DELTA_RULE value
        gdr_why = str(e)
    runs = ("chunked pure-torch reference (ops.delta_rule)" if gdr_why
            else "flash-linear-attention's chunk kernels (ops.delta_rule.fla_adapter)" if not why
            else "Triton chunked kernels (ops.delta_rule.triton_delta_rule)")
    out.append({"path": "gated delta rule (R)", "runs": runs,
                "why_not": "; ".join(w for w in (f"Triton gated delta rule: {gdr_why}" if gdr_why else "",
                                                 f"fla: {why}" if why else "") if w)})

    dt = torch.bfloat16 if cuda else torch.float32
    gm = grouped_mm_available(device, dt, 64, 128, 64)
    out.append({"path": f"MoE experts ({str(dt).replace('torch.', '')})",
                "runs": "torch._grouped_mm" if gm else "padded bmm",
                "why_not": "" if gm else "torch._grouped_mm unavailable for this device/dtype"})

    from .model import attention as attn
    try:
        backend, bad = attn.attention_backend(device), ""
    except (ValueError, RuntimeError) as e:
        backend, bad = "sdpa", str(e)
    if bad:
        flex_why = f"FlexAttention: {bad}"
    elif attn._flex_attention is None:
        flex_why = f"FlexAttention: torch {torch.__version__} has no flex_attention"
    elif attn.ATTENTION_BACKEND or os.environ.get("MEGACPP_ATTENTION"):
        flex_why = "FlexAttention: MEGACPP_ATTENTION=sdpa forces SDPA"
    else:
        flex_why = "FlexAttention: CUDA only (torch has no FlexAttention backward on CPU)"
    if backend == "flex":
        packed = ("FlexAttention, document BlockMask (compiled)",
                  (f"layers with heads below {attn.FLEX_MIN_HEAD_DIM} dims take SDPA (flex's kernel refuses them)"
                   if cuda else "CPU: forward only, torch has no FlexAttention backward on CPU"))
    else:
        packed = ("SDPA with a block-diagonal bool mask",
                  ("flash backend takes no mask; " if cuda else "") + flex_why)
    if cuda:
        from torch.backends import cuda as bc
        sdpa = [n for n, ok in (("flash", bc.flash_sdp_enabled()), ("mem_efficient", bc.mem_efficient_sdp_enabled()),
                                ("cudnn", bc.cudnn_sdp_enabled())) if ok]
        out.append({"path": "attention (no packing)", "runs": f"SDPA is_causal ({', '.join(sdpa)} enabled)",
                    "why_not": ""})
    else:
        out.append({"path": "attention (no packing)", "runs": "SDPA math/CPU kernels", "why_not": "no CUDA"})
    out.append({"path": "attention (packed documents)", "runs": packed[0], "why_not": packed[1]})

    if cuda:
        comp = "inductor (Triton)" if tri else "unavailable"
        why = "" if tri else "Triton missing"
    else:
        cc = shutil.which("cc") or shutil.which("gcc")
        comp = "inductor (C++)" if cc else "unavailable"
        why = "" if cc else "no C/C++ compiler for inductor's CPU backend"
    out.append({"path": "torch.compile", "runs": comp, "why_not": why})

    ao = _version("torchao")
    if not cuda:
        why = "FP8 training needs CUDA"
    elif cap < (8, 9):
        why = f"compute capability {cap[0]}.{cap[1]} < 8.9 has no FP8 tensor cores"
    elif ao is None:
        why = "torchao not installed"
    else:
        why = ""
    out.append({"path": "FP8 (torchao)", "runs": f"torchao {ao}" if not why else "no", "why_not": why})
    from .ops.fp8_grouped import fp8_grouped_unavailable, quant_path
    why = fp8_grouped_unavailable(device) or ""
    if not why:
        try:
            runs = f"torch._scaled_grouped_mm, rowwise; quantizer: {quant_path(device)}"
        except (ValueError, RuntimeError) as e:   # a bad or unrunnable MEGACPP_FP8_QUANT
            runs, why = "no", str(e)
    out.append({"path": "FP8 MoE experts", "runs": runs if not why else "no", "why_not": why})
    native_fp4 = cuda and cap is not None and cap[0] >= 10
    out.append({"path": "NVFP4", "runs": "native" if native_fp4 else "emulated (quantize-dequantize)",
                "why_not": "" if native_fp4 else "no FP4 tensor cores before Blackwell (sm_100)"})
    return out


def header(device: torch.device) -> str:
    from .train.device import device_facts

    f = device_facts(device)
    return (f"device {f.get('name')} ({device}), torch {f['torch']}, triton {f.get('triton')}, "
            f"cuda {f.get('cuda')}, capability {f.get('capability')}")
