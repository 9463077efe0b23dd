"""Which gated delta rule runs: fla's kernels, the project's Triton kernels or
the pure-torch reference.

    gated_delta_rule_fast(q, k, v, g, beta, initial_state=None, chunk_size=64, scale=None)

has `reference.gated_delta_rule`'s signature and returns. It takes the
Triton kernels when `delta_rule_backend(q.device, q.dtype)` says so: q on
CUDA, triton importable, the environment variable MEGACPP_DELTA_RULE not
"reference", q not float64 (the reference is the float64 oracle) and
chunk_size within the kernels' limit. Of the two Triton paths,
flash-linear-attention's (`fla_adapter`) runs where fla is installed, its
own version guard allows it and the chunk is its 64 ("fla"); the project's
(`triton_delta_rule.gated_delta_rule_triton`) otherwise ("triton").
Everything else goes to `reference.gated_delta_rule`.
MEGACPP_DELTA_RULE=triton takes the project's kernels and makes a missing
Triton path an error instead of a silent fallback.

Nothing here imports triton until a CUDA tensor asks for it, so importing
megacpp never needs triton.
"""
from __future__ import annotations

import torch

from .._backend import CHOICES  # noqa: F401  (re-exported: the values of ENV)
from .._backend import KernelBackend, assume_constant, autocast_operands, kernels_import_error
from .fla_adapter import FLA_CHUNK, fla_refusal, gated_delta_rule_fla
from .reference import gated_delta_rule as gated_delta_rule_reference

ENV = "MEGACPP_DELTA_RULE"
# The kernels' limits (triton_delta_rule imports them from here, so this
# module can state them without importing triton): C x C tiles and a
# dk x BV state block live in registers.
MAX_CHUNK = 128
MAX_DK = 256


@assume_constant  # see _backend.assume_constant: dynamo bakes in the result
def triton_import_error() -> str:
    """'' when megacpp.ops.delta_rule.triton_delta_rule imports, else the reason (cached)."""
    return kernels_import_error(f"{__package__}.triton_delta_rule")


BACKEND = KernelBackend(ENV, "gated delta rule", f"{__package__}.triton_delta_rule", "gated_delta_rule_triton",
                        triton_import_error)


def _limit(chunk_size: int | None, dk: int | None) -> str:
    """Why the kernels' limits rule out these sizes ('' if they do not)."""
    if chunk_size is not None and not 1 <= chunk_size <= MAX_CHUNK:
        return f"chunk_size {chunk_size} outside the kernels' [1, {MAX_CHUNK}]"
    if dk is not None and dk > MAX_DK:
        return f"dk {dk} > {MAX_DK}"
    return ""


def delta_rule_backend_reason(device, dtype: torch.dtype | None = None, chunk_size: int | None = None,
                              dk: int | None = None) -> str:
    """'' if gated_delta_rule_fast runs the Triton kernels for tensors on `device` (of `dtype`), else why not."""
    return BACKEND.reason(device, dtype, _limit(chunk_size, dk))


_FLA_REFUSALS: dict[int, str] = {}


@assume_constant  # dynamo bakes the answer in: no fla import or device query in a traced frame
def fla_refusal_on(device_index: int) -> str:
    """fla_adapter.fla_refusal for cuda:device_index, cached."""
    if device_index not in _FLA_REFUSALS:
        _FLA_REFUSALS[device_index] = fla_refusal(torch.device("cuda", device_index))
    return _FLA_REFUSALS[device_index]


def fla_reason(device, chunk_size: int | None = None) -> str:
    """'' when the Triton path of this device would be fla's, else why it is the project's."""
    device = torch.device(device)
    if BACKEND.choice() == "triton":
        return "MEGACPP_DELTA_RULE=triton takes the project's kernels"
    if chunk_size not in (None, FLA_CHUNK):
        return f"chunk_size {chunk_size}: fla runs chunks of {FLA_CHUNK}"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "fla kernels need CUDA"
    return fla_refusal_on(device.index if device.index is not None else torch.cuda.current_device())


def delta_rule_backend(device, dtype: torch.dtype | None = None, chunk_size: int | None = None,
                       dk: int | None = None) -> str:
    """'fla', 'triton' or 'reference': what gated_delta_rule_fast runs for tensors on `device` (of `dtype`)."""
    if BACKEND.backend(delta_rule_backend_reason(device, dtype, chunk_size, dk)) == "reference":
        return "reference"
    return "triton" if fla_reason(device, chunk_size) else "fla"


def gated_delta_rule_fast(q, k, v, g, beta, initial_state=None, chunk_size=64, scale=None,
                          keep_states=False):
    """reference.gated_delta_rule's signature; Triton on CUDA when available (see delta_rule_backend).
    keep_states: the project's kernels keep their intermediates for the backward
    (triton_delta_rule.gated_delta_rule_triton); fla and the reference ignore it."""
    backend = delta_rule_backend(q.device, q.dtype, chunk_size, q.shape[-1])
    if backend != "reference":  # the matmul operands, as the reference's einsums get them under autocast
        q, k, v = autocast_operands(q.device, q, k, v)
    if backend == "fla":
        return gated_delta_rule_fla(q, k, v, g, beta, initial_state, chunk_size=chunk_size, scale=scale)
    if backend == "triton":
        from .triton_delta_rule import gated_delta_rule_triton
        return gated_delta_rule_triton(q, k, v, g, beta, initial_state, chunk_size=chunk_size, scale=scale,
                                       keep_states=keep_states)
    return gated_delta_rule_reference(q, k, v, g, beta, initial_state, chunk_size=chunk_size, scale=scale)
