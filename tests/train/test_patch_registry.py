"""install_patches: best backend first, and a backend whose parity check fails
hands over to the next one (recorded), before the plain path."""
from __future__ import annotations

import pytest
import torch

from megacpp.errors import MegacppError
from megacpp.patches import registry
from megacpp.patches.registry import Backend, ParityResult, Patch, install_patches


class _Fake(Patch):
    name = "fake_patch"
    replaces = "nothing"

    def __init__(self, passing: set[str], names=("fast", "slow", "portable")):
        self.passing, self.names, self.installed = passing, names, None

    def backends(self, device):
        return [Backend(n, True, version="1") for n in self.names] + [Backend("gone", False, "not here")]

    def install(self, model, backend):
        self.installed = backend

    def parity(self, device, dtype, backend, small=True):
        ok = backend in self.passing
        return ParityResult(ok, "float32", "cpu", backend, {"x": 0.0 if ok else 1.0}, 1e-3,
                            "" if ok else f"{backend} differs")


@pytest.fixture
def fake(monkeypatch):
    def make(passing):
        p = _Fake(passing)
        monkeypatch.setitem(registry.REGISTRY, p.name, p)
        monkeypatch.setattr(registry, "_load_builtin", lambda: None)
        return p
    return make


def test_first_backend_that_passes_is_installed(fake):
    p = fake({"slow", "portable"})
    (rec,) = install_patches(None, {"fake_patch": "preferred"}, torch.device("cpu"), torch.float32)
    assert rec.installed and rec.backend == "slow" and p.installed == "slow"
    assert [r["backend"] for r in rec.parity] == ["fast", "slow"]
    assert rec.reason == "fast failed its parity check (fast differs); gone unavailable: not here"


def test_all_failing_falls_back_to_plain_or_stops_when_required(fake):
    fake(set())
    (rec,) = install_patches(None, {"fake_patch": "preferred"}, torch.device("cpu"), torch.float32)
    assert not rec.installed and rec.reason.endswith("plain path used")
    assert len(rec.parity) == 3
    with pytest.raises(MegacppError, match="policy.patches.fake_patch: parity check failed"):
        install_patches(None, {"fake_patch": "required"}, torch.device("cpu"), torch.float32)


def test_no_check_installs_the_best(fake):
    p = fake(set())
    (rec,) = install_patches(None, {"fake_patch": "preferred"}, torch.device("cpu"), torch.float32, check=False)
    assert rec.installed and p.installed == "fast" and rec.parity == []
