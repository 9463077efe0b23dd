"""The GPU's SM clock, power and temperature while a benchmark runs.

MFU is counted against the card's datasheet peak, which assumes its boost
clock; a card held at its power limit runs its tensor cores slower (nam-1b's
GEMMs ran at 56-64% of peak where nam-125m's same-shaped head GEMMs ran at
73-83%, fourteenth session). The bench therefore records what the card did
while it timed the steps: `nvidia-smi` queried from a background thread (it
ships with the driver; no Python binding needed), summarised as medians and
minimums. Off CUDA, or without nvidia-smi, the record says why not. A
training run samples its card the same way, once a second, into its
manifest (`outcome.clocks`): two runs of the same code on two cards of one
kind differed by 4% in tokens/s with their SM clocks 0.80 and 0.86 of the
boost (nam-1b, fifteenth session). A run keeps only the samples taken while
its training steps run (`gate`): its compile, evaluations and saves leave
the card idle at its boost clock (the sixteenth session's first run
manifests read a median of 1,980 MHz at 121 W for a run whose steps ran
capped at 700 W).
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading

import torch

FIELDS = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "temperature.gpu",
          "clocks_throttle_reasons.active")
# drivers that dropped the old name know the reasons as "clocks_event_reasons.active"
REASON_FIELDS = ("clocks_throttle_reasons.active", "clocks_event_reasons.active")


def _device_id(device: torch.device) -> str:
    """The card as nvidia-smi names it: its UUID (CUDA_VISIBLE_DEVICES renumbers
    the cards a process sees; the UUID does not)."""
    uuid = str(getattr(torch.cuda.get_device_properties(device), "uuid", "") or "")
    if uuid:
        return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
    return str(device.index or 0)


def parse_samples(lines: list[str]) -> list[dict]:
    """nvidia-smi's csv rows (noheader, nounits, FIELDS order; the reasons
    column may be missing) -> dicts; rows it could not fill ("[N/A]", short
    rows) are skipped."""
    out = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == len(FIELDS) - 1:
            parts.append("?")
        if len(parts) != len(FIELDS):
            continue
        try:
            sm, sm_max, power, limit, temp = (float(p) for p in parts[:5])
        except ValueError:
            continue
        out.append({"sm_mhz": sm, "sm_max_mhz": sm_max, "power_w": power, "power_limit_w": limit,
                    "temp_c": temp, "throttle": parts[5]})
    return out


def summarize(samples: list[dict]) -> dict:
    """Medians and extremes of the samples; the throttle reasons nvidia-smi reported
    (a bit mask: 0x4 software power cap, 0x20 software thermal, 0x40/0x80 hardware)."""
    if not samples:
        return {"available": False, "why": "no samples"}
    sm = [s["sm_mhz"] for s in samples]
    power = [s["power_w"] for s in samples]
    reasons = sorted({s["throttle"] for s in samples})
    return {"available": True, "samples": len(samples),
            "sm_mhz_median": statistics.median(sm), "sm_mhz_min": min(sm),
            "sm_max_mhz": samples[0]["sm_max_mhz"],
            "sm_clock_share": statistics.median(sm) / samples[0]["sm_max_mhz"] if samples[0]["sm_max_mhz"] else None,
            "power_w_median": statistics.median(power), "power_w_max": max(power),
            "power_limit_w": samples[0]["power_limit_w"],
            "temp_c_max": max(s["temp_c"] for s in samples), "throttle_reasons": reasons}


class ClockSampler:
    """with ClockSampler(device) as c: ...; then c.result (summarize's dict).

    A thread queries nvidia-smi once every `period_ms` (one short process a
    sample: its looping mode writes through a pipe buffer that a stopped
    process may never flush). A long run keeps at most `max_samples`: past
    that every second sample is dropped and the period doubled, so the kept
    ones stay evenly spread over the whole run.

    gate: None keeps every sample (the bench samples only around its timed
    steps); a run sets it False and opens it (True) around the steps it
    counts, `window` naming them in the summary."""

    def __init__(self, device: torch.device, period_ms: int = 200, exe: str | None = None,
                 max_samples: int = 20_000, window: str = ""):
        self.device, self.period_ms, self.max_samples = device, period_ms, max(2, max_samples)
        self.gate: bool | None = None
        self.window = window
        self.exe = exe or shutil.which("nvidia-smi")
        self.result: dict = {"available": False, "why": "not run"}
        self._cmd: list[str] | None = None
        self._lines: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self):
        if self.device.type != "cuda":
            self.result = {"available": False, "why": "not a CUDA device"}
        elif not self.exe:
            self.result = {"available": False, "why": "nvidia-smi not found"}
        else:
            try:
                dev_id = _device_id(self.device)
                fields, error = self._fields(dev_id)
            except (OSError, subprocess.SubprocessError) as e:
                fields, error = None, f"did not run: {e}"
            if fields is None:
                self.result = {"available": False, "why": f"nvidia-smi: {error}"}
                return self
            self._cmd = [self.exe, "-i", dev_id, "--query-gpu=" + ",".join(fields), "--format=csv,noheader,nounits"]
            self._thread = threading.Thread(target=self._poll, name="megacpp-clocks", daemon=True)
            self._thread.start()
        return self

    def _fields(self, dev_id: str) -> tuple[list[str] | None, str]:
        """(FIELDS with the throttle-reasons column this driver knows, or without
        it; ""), one quick query per choice; (None, its last error line) where
        nvidia-smi answers none of them."""
        core = list(FIELDS[:-1])
        error = ""
        for fields in [core + [r] for r in REASON_FIELDS] + [core]:
            q = subprocess.run([self.exe, "-i", dev_id, "--query-gpu=" + ",".join(fields),
                                "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
            if q.returncode == 0:
                return fields, ""
            error = ((q.stderr or q.stdout).strip().splitlines() or [f"exit status {q.returncode}"])[-1]
        return None, error

    def _poll(self) -> None:
        while True:
            try:
                open_before = self.gate is not False
                q = subprocess.run(self._cmd, capture_output=True, text=True, timeout=10)
                # a sample counts only if the gate was open when it was asked and answered
                if q.returncode == 0 and open_before and self.gate is not False:
                    self._lines.extend(q.stdout.splitlines())
                    if len(self._lines) > self.max_samples:
                        self._lines = self._lines[::2]
                        self.period_ms *= 2
            except (OSError, subprocess.SubprocessError):
                pass
            if self._stop.wait(self.period_ms / 1e3):
                return

    def _summary(self) -> dict:
        out = summarize(parse_samples(list(self._lines)))
        if self.window:
            out["window"] = self.window
            if not out["available"]:
                out["why"] = f"no samples in the window ({self.window})"
        return out

    def current(self) -> dict:
        """The summary so far while sampling (a checkpoint's manifest mid-run),
        the final one after: a run killed before its end still has the clocks
        of its last save."""
        if self._thread is not None and self._thread.is_alive():
            return self._summary()
        return self.result

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=15)
            self.result = self._summary()
        return False


def mfu_at_clock(mfu: float | None, rec: dict | None) -> float | None:
    """MFU against the peak at the SM clock the card ran at (median) rather than
    at its boost clock: tensor throughput scales with the SM clock, so this is
    the share of what the card could do at the clock its power budget allowed.
    None where either is unknown. A derived figure: MFU itself stays the
    datasheet-peak one."""
    share = (rec or {}).get("sm_clock_share") if (rec or {}).get("available") else None
    return mfu / share if mfu is not None and share else None


def clocks_text(rec: dict, mfu: float | None = None) -> str:
    """One line for the bench text: "SM 1,650 MHz median (min 1,590) of 1,980, 0.83; 690 W of 700",
    and where `mfu` is given, the MFU at that clock."""
    if not rec or not rec.get("available"):
        return f"clocks: not sampled ({rec.get('why', '?') if rec else '?'})"
    share = f", {rec['sm_clock_share']:.2f}" if rec.get("sm_clock_share") else ""
    at_clock = mfu_at_clock(mfu, rec)
    return (f"clocks while timed: SM {rec['sm_mhz_median']:,.0f} MHz median (min {rec['sm_mhz_min']:,.0f}) "
            f"of {rec['sm_max_mhz']:,.0f}{share}; power {rec['power_w_median']:.0f} W median "
            f"(max {rec['power_w_max']:.0f}) of {rec['power_limit_w']:.0f}; {rec['temp_c_max']:.0f} C max; "
            f"throttle reasons {', '.join(rec['throttle_reasons'])}"
            + (f"; MFU at this clock {at_clock * 100:.1f}%" if at_clock is not None else ""))
