"""FP8 training GEMMs through torchao's Float8Linear (rowwise or tensorwise recipe).

Only where they run for real: a CUDA device of compute capability 8.9 or
newer (Ada, Hopper, Blackwell: FP8 tensor cores) with torchao importable.
Anywhere else a recipe asking for FP8 is refused with an error naming
policy.precision.low_precision; nothing falls back silently.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ...errors import MegacppError

RECIPES = {"fp8_rowwise": "rowwise", "fp8_tensorwise": "tensorwise"}
MIN_CAPABILITY = (8, 9)


def fp8_unavailable(device: torch.device) -> str | None:
    """Why FP8 GEMMs cannot run on this device, or None when they can."""
    if device.type != "cuda":
        return f"FP8 GEMMs need a CUDA device with compute capability >= 8.9; this run is on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return (f"FP8 GEMMs need compute capability >= 8.9 (FP8 tensor cores); "
                f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    try:
        import torchao.float8  # noqa: F401
    except Exception as e:  # ImportError, or a torchao built for another torch
        return f"FP8 GEMMs go through torchao, which does not import here ({type(e).__name__}: {e}); pip install 'megacpp[gpu]'"
    return None


def require_fp8(low_precision: str, compute: str, device: torch.device) -> None:
    why = fp8_unavailable(device)
    if why:
        raise MegacppError(f"policy.precision.low_precision={low_precision}: {why}. "
                           f"Use low_precision=none or nvfp4_emulated on this device")
    if compute != "bf16":
        raise MegacppError(f"policy.precision.low_precision={low_precision} casts bf16 GEMM inputs to FP8; "
                           f"policy.precision.compute must be bf16, got {compute}")


def convert_fp8(model: nn.Module, low_precision: str, convert: set[str], emulate: bool = False) -> tuple[set[str], str]:
    """Swap the named nn.Linear modules for torchao Float8Linear.

    Returns (names actually swapped, backend text). `emulate` runs torchao's
    emulated FP8 GEMM, usable on CPU: the tests use it to check the swap;
    runs never do (require_fp8 guards them).
    """
    import torchao
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    recipe = RECIPES[low_precision]
    config = Float8LinearConfig.from_recipe_name(recipe)
    if emulate:
        config = dataclasses.replace(config, emulate=True)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn in convert, config=config)
    swapped = {n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear"}
    backend = f"torchao {torchao.__version__} Float8Linear, {recipe} recipe" + (" (emulated)" if emulate else "")
    return swapped, backend
