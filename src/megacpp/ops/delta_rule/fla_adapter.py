"""flash-linear-attention's chunked gated delta rule, where fla's own guard lets it run.

fla (the `fla-core` / `flash-linear-attention` packages) ships Triton kernels
for Gated DeltaNet in the layout of `reference.gated_delta_rule`: q, k
(b, l, h, dk), v (b, l, h, dv), g and beta (b, l, h), initial and final state
(b, h, dk, dv); g is the natural-log decay and beta is taken after the
sigmoid, as here, and its default scale is dk^-0.5, as here. Its chunk is 64.

fla refuses the gated backward on Hopper with Triton >= 3.4.0 and < 3.7.1
(wrong results; fla issue 640). On such a machine (the lent H100/H200s carry
Triton 3.6) the project's own Triton kernels run instead, and `fla_refusal`
says why. Nothing here imports fla or triton until a CUDA tensor asks.
"""
from __future__ import annotations

import importlib
import importlib.metadata

import torch

from .._backend import assume_constant

FLA_CHUNK = 64
FLA_PACKAGES = ("fla-core", "flash-linear-attention")
# fla's own guard (fla/ops/common/chunk_o.py in fla 0.6.0): Hopper, Triton in this range
BAD_TRITON_ON_HOPPER = ((3, 4, 0), (3, 7, 1))


def _vtuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out + [0] * (3 - len(out)))


def fla_version() -> str | None:
    for name in FLA_PACKAGES:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def fla_guard(capability: tuple[int, int] | None, triton_version: str | None, fla: str = "?") -> str:
    """'' when fla's own guard lets its gated delta rule run on a device of this
    compute capability with this Triton, else the refusal in words."""
    if capability is None:
        return "fla kernels need CUDA"
    if triton_version is None:
        return "triton missing"
    lo, hi = BAD_TRITON_ON_HOPPER
    if capability[0] == 9 and lo <= _vtuple(triton_version) < hi:
        return (f"fla {fla} refuses the gated delta rule backward on Hopper with Triton {triton_version} "
                f"(>= 3.4.0 and < 3.7.1 give wrong results, fla issue 640)")
    return ""


_REFUSALS: dict[str, str] = {}


@assume_constant  # dynamo bakes the answer in: no fla import inside a traced frame
def _import_refusal() -> str:
    """'' when fla's gated delta rule imports, else why not (cached)."""
    err = _REFUSALS.get("import")
    if err is None:
        try:
            importlib.import_module("fla.ops.gated_delta_rule")
            err = ""
        except ModuleNotFoundError as e:
            err = ("flash-linear-attention not installed" if (e.name or "").split(".")[0] == "fla"
                   else f"fla does not import: {e}")
        except Exception as e:  # fla's import-time checks (torch / triton versions)
            err = f"fla does not import: {type(e).__name__}: {e}"
        _REFUSALS["import"] = err
    return err


def fla_refusal(device) -> str:
    """'' when fla's gated delta rule would run for tensors on `device`, else why not."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return "fla kernels need CUDA"
    if fla_version() is None:
        return "flash-linear-attention not installed"
    try:
        import triton
        tri = triton.__version__
    except ImportError:
        tri = None
    why = fla_guard(torch.cuda.get_device_capability(device), tri, fla_version() or "?")
    return why or _import_refusal()


def gated_delta_rule_fla(q, k, v, g, beta, initial_state=None, chunk_size=FLA_CHUNK, scale=None):
    """reference.gated_delta_rule's signature and returns, through fla's chunk kernels.

    chunk_size must be fla's 64 (the dispatcher only sends that size here).
    """
    if chunk_size != FLA_CHUNK:
        raise ValueError(f"fla's gated delta rule runs chunks of {FLA_CHUNK}, got chunk_size={chunk_size}")
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    o, final = chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                      output_final_state=True)
    return o.to(q.dtype), final.to(q.dtype)
