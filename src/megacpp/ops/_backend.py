"""The backend choice shared by the Triton op dispatchers (ops/ssd/dispatch.py,
ops/delta_rule/dispatch.py): the environment variable that forces or disables
the kernels, the device/dtype reasons, the cached import check of a kernels
module, and the lazy package attribute for its entry point.

Nothing here imports triton: the kernels module is imported (by name) only
when a caller asks whether it can run.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

CHOICES = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_IMPORT_ERRORS: dict[str, str] = {}  # kernels module -> why it cannot be imported ("" = it can)


def assume_constant(fn):
    # Under torch.compile, dynamo calls fn eagerly and bakes in its result:
    # the first import of a kernels module (which registers the custom ops)
    # then never happens inside a traced frame. Each package decorates its
    # own module-level triton_import_error with this.
    deco = getattr(torch.compiler, "assume_constant_result", None)
    return deco(fn) if deco is not None else fn


def kernels_import_error(module: str) -> str:
    """'' when `module` (a Triton kernels module) imports, else the reason (cached)."""
    err = _IMPORT_ERRORS.get(module)
    if err is None:
        try:
            importlib.import_module(module)
            err = ""
        except ModuleNotFoundError as e:
            err = "triton missing" if e.name == "triton" else f"{type(e).__name__}: {e}"
        except Exception as e:  # a triton too old for the kernels, ...
            err = f"{type(e).__name__}: {e}"
        _IMPORT_ERRORS[module] = err
    return err


def autocast_operands(device, *tensors):
    """`tensors` as autocast would hand them to a matmul on `device`: float32
    ones cast to the autocast dtype while autocast is on there, the rest (and
    None) unchanged.

    The Triton ops are custom ops, which autocast does not touch, while the
    reference's einsums are autocast to bf16; without this the kernels would
    get float32 matmul operands under a bf16 recipe and run them at float32
    speed (and precision), unlike the path they stand in for.
    """
    kind = torch.device(device).type
    if not torch.is_autocast_enabled(kind):
        return tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.dtype == torch.float32 else t for t in tensors)


class KernelBackend:
    """Triton kernels vs the pure-torch reference for one op.

    env: the environment variable ("auto" / "triton" / "reference"); title:
    the op's name in the MEGACPP_...=triton error; module, entry: the kernels
    module and its entry point; import_error: the package's module-level,
    assume_constant triton_import_error.
    """

    def __init__(self, env: str, title: str, module: str, entry: str, import_error: Callable[[], str]):
        self.env = env
        self.title = title
        self.module = module
        self.entry = entry
        self.import_error = import_error

    def choice(self) -> str:
        forced = os.environ.get(self.env, "").strip().lower() or "auto"
        if forced not in CHOICES:
            raise ValueError(f"{self.env}={forced!r}: expected one of {CHOICES}")
        return forced

    def reason(self, device, dtype: torch.dtype | None = None, limit: str = "") -> str:
        """'' if the kernels run for tensors on `device` (of `dtype`), else why not.
        `limit`: the op's own shape limit that is exceeded ('' if none)."""
        device = torch.device(device)
        if self.choice() == "reference":
            return f"disabled by {self.env}=reference"
        if device.type != "cuda":
            return "no CUDA" if not torch.cuda.is_available() else f"tensors on {device.type}, not CUDA"
        if dtype is not None and dtype not in KERNEL_DTYPES:
            return f"{dtype} inputs stay on the reference (kernels compute in float32)"
        if limit:
            return limit
        err = self.import_error()
        if err:
            return err if err == "triton missing" else f"triton kernels unavailable ({err})"
        return ""

    def backend(self, why: str) -> str:
        """'triton' or 'reference' given reason()'s answer; raises if forced to triton and it cannot run."""
        if why and self.choice() == "triton":
            raise RuntimeError(f"{self.env}=triton, but the Triton {self.title} cannot run: {why}")
        return "reference" if why else "triton"

    def package_attr(self, package: str, name: str):
        """The package's __getattr__: the kernels' entry point, imported on
        first access so that importing megacpp never imports triton; without
        triton it is simply absent."""
        if name == self.entry:
            err = self.import_error()
            if err:
                raise AttributeError(f"{package}.{self.entry} is unavailable: {err}")
            return getattr(importlib.import_module(self.module), self.entry)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
