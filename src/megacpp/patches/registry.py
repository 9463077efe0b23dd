"""Memory patches: named replacements of hot paths, each with a parity check.

A patch says what it replaces, which backends it can use on this machine and
why not, installs itself on a model for a run, and checks itself against the
plain path it replaces on fresh random inputs (forward and gradients). The
trainer records every patch's outcome — installed with backend, version and
parity result, or not installed and why — in the run manifest.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..errors import MegacppError


@dataclass
class Backend:
    name: str
    available: bool
    reason: str = ""          # why not, when unavailable
    version: str = ""


@dataclass
class ParityResult:
    passed: bool
    dtype: str
    device: str
    backend: str
    max_rel_err: dict[str, float] = field(default_factory=dict)
    tolerance: float = 0.0
    detail: str = ""


@dataclass
class PatchRecord:
    name: str
    replaces: str
    mode: str                 # required | preferred | off
    installed: bool
    backend: str = ""
    version: str = ""
    reason: str = ""          # why not installed / why a fallback was taken
    parity: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Patch:
    name: str = ""
    replaces: str = ""

    def backends(self, device: torch.device) -> list[Backend]:
        raise NotImplementedError

    def applicable(self, model) -> tuple[bool, str]:
        return True, ""

    def install(self, model, backend: str) -> None:
        raise NotImplementedError

    def parity(self, device: torch.device, dtype: torch.dtype, backend: str, small: bool = True) -> ParityResult:
        raise NotImplementedError

    def best_backend(self, device: torch.device) -> Backend | None:
        for b in self.backends(device):
            if b.available:
                return b
        return None


REGISTRY: dict[str, Patch] = {}


def register(patch: Patch) -> Patch:
    REGISTRY[patch.name] = patch
    return patch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def install_patches(model, wanted: dict[str, str], device: torch.device, dtype: torch.dtype,
                    check: bool = True) -> list[PatchRecord]:
    """Install the recipe's patches; raise if a required one cannot run here."""
    _load_builtin()
    records = []
    for name, mode in wanted.items():
        patch = REGISTRY[name]
        rec = PatchRecord(name, patch.replaces, mode, installed=False)
        if mode == "off":
            rec.reason = "off in the recipe"
            records.append(rec)
            continue
        ok, why = patch.applicable(model)
        if not ok:
            rec.reason = f"not applicable: {why}"
            records.append(rec)
            continue
        all_backends = patch.backends(device)
        available = [b for b in all_backends if b.available]
        if not available:
            reasons = "; ".join(f"{b.name}: {b.reason}" for b in all_backends)
            if mode == "required":
                raise MegacppError(f"policy.patches.{name}: required but cannot run here ({reasons})")
            rec.reason = f"no backend available ({reasons}); plain path used"
            records.append(rec)
            continue
        # best first; a backend whose parity check fails hands over to the next
        chosen, failed = None, []
        for backend in available:
            if check:
                res = patch.parity(device, dtype, backend.name, small=True)
                rec.parity.append(asdict(res))
                if not res.passed:
                    failed.append(f"{backend.name} failed its parity check ({res.detail or res.max_rel_err})")
                    continue
            chosen = backend
            break
        if chosen is None:
            if mode == "required":
                raise MegacppError(f"policy.patches.{name}: parity check failed on {device} "
                                   f"({'; '.join(failed)})")
            rec.reason = "; ".join(failed) + "; plain path used"
            records.append(rec)
            continue
        patch.install(model, chosen.name)
        rec.installed, rec.backend, rec.version = True, chosen.name, chosen.version
        notes = failed + [f"{b.name} unavailable: {b.reason}" for b in all_backends if not b.available]
        if notes:
            rec.reason = "; ".join(notes)
        records.append(rec)
    return records


def _load_builtin() -> None:
    from . import dsa_indexer, linear_ce  # noqa: F401  (register on import)


def all_patches() -> dict[str, Patch]:
    _load_builtin()
    return REGISTRY
