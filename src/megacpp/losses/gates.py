"""Step gates for auxiliary losses: run policy, never model identity.

A gate turns a loss on at `start_step` and ramps its weight linearly over
`warmup_steps`. Before the start the loss is not computed at all (it adds
exactly nothing and no gradient). The first step at which a gate was active
is recorded, checkpointed and written to the manifest.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Gate:
    name: str
    enabled: bool
    weight: float
    start_step: int
    warmup_steps: int
    first_active_step: int | None = None

    def weight_at(self, step: int) -> float:
        if not self.enabled or self.weight == 0.0 or step < self.start_step:
            return 0.0
        if self.warmup_steps <= 0:
            return self.weight
        return self.weight * min(1.0, (step - self.start_step + 1) / self.warmup_steps)

    def active(self, step: int) -> bool:
        return self.weight_at(step) > 0.0

    def mark(self, step: int) -> None:
        if self.first_active_step is None and self.active(step):
            self.first_active_step = step

    def describe(self) -> dict:
        return {"enabled": self.enabled, "weight": self.weight, "start_step": self.start_step,
                "warmup_steps": self.warmup_steps, "first_active_step": self.first_active_step,
                "delayed": self.enabled and self.start_step > 0}


class GateSet:
    """The gates of one run, keyed by loss name."""

    def __init__(self, gates: dict[str, Gate]):
        self.gates = gates

    @classmethod
    def from_policy(cls, aux, applicable: dict[str, bool]) -> "GateSet":
        """`applicable`: whether the model has what each loss needs (E, D layers, MTP)."""
        gates = {}
        for name, spec in (("stp", aux.stp), ("moe", aux.moe), ("dsa", aux.dsa), ("mtp", aux.mtp)):
            on = bool(spec.enabled and applicable.get(name, True))
            gates[name] = Gate(name, on, float(spec.weight), int(spec.start_step), int(spec.warmup_steps))
        # router z-loss shares the MoE gate's schedule with its own weight
        gates["moe_z"] = Gate("moe_z", gates["moe"].enabled, float(aux.moe.z_loss_weight),
                              int(aux.moe.start_step), int(aux.moe.warmup_steps))
        return cls(gates)

    def __getitem__(self, name: str) -> Gate:
        return self.gates[name]

    def mark(self, step: int) -> None:
        for g in self.gates.values():
            g.mark(step)

    def state_dict(self) -> dict:
        return {n: {"first_active_step": g.first_active_step} for n, g in self.gates.items()}

    def load_state_dict(self, state: dict) -> None:
        for n, s in state.items():
            if n in self.gates:
                self.gates[n].first_active_step = s["first_active_step"]

    def describe(self) -> dict:
        return {n: g.describe() for n, g in self.gates.items()}
