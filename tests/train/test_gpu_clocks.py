"""The bench's clock sampler: nvidia-smi's rows parsed and summarised, the
throttle-reasons column found under either of its names, and a clear record
where nothing can be sampled (off CUDA, no nvidia-smi, nvidia-smi failing)."""
from __future__ import annotations

import os
import stat
import sys
import textwrap

import pytest
import torch

from megacpp.train import gpu_clocks
from megacpp.train.gpu_clocks import ClockSampler, clocks_text, mfu_at_clock, parse_samples, summarize


def test_parse_and_summarize_rows():
    rows = ["1980, 1980, 410.5, 700.00, 41, 0x0000000000000000",
            "1650, 1980, 699.8, 700.00, 55, 0x0000000000000004",
            "1590, 1980, 700.2, 700.00, 57, 0x0000000000000004",
            "[N/A], 1980, 700.0, 700.00, 57, 0x0",      # unfilled: skipped
            "1700, 1980"]                                 # short: skipped
    s = summarize(parse_samples(rows))
    assert s["available"] and s["samples"] == 3
    assert s["sm_mhz_median"] == 1650 and s["sm_mhz_min"] == 1590 and s["sm_max_mhz"] == 1980
    assert s["sm_clock_share"] == pytest.approx(1650 / 1980)
    assert s["power_w_median"] == pytest.approx(699.8) and s["power_w_max"] == pytest.approx(700.2)
    assert s["temp_c_max"] == 57
    assert s["throttle_reasons"] == ["0x0000000000000000", "0x0000000000000004"]
    assert "SM 1,650 MHz median (min 1,590) of 1,980, 0.83" in clocks_text(s)
    assert "MFU at this clock" not in clocks_text(s)
    # MFU against the peak at the median clock: 0.41 of the boost peak at 1650/1980 of it
    assert mfu_at_clock(0.41, s) == pytest.approx(0.41 * 1980 / 1650)
    assert clocks_text(s, 0.41).endswith(f"; MFU at this clock {0.41 * 1980 / 1650 * 100:.1f}%")
    assert mfu_at_clock(None, s) is None and mfu_at_clock(0.41, {"available": False, "why": "x"}) is None
    # rows without the reasons column (a driver that knows neither name)
    s2 = summarize(parse_samples(["1500, 1980, 650, 700, 50"]))
    assert s2["samples"] == 1 and s2["throttle_reasons"] == ["?"]
    assert summarize([]) == {"available": False, "why": "no samples"}


def test_not_sampled_off_cuda_or_without_nvidia_smi():
    with ClockSampler(torch.device("cpu")) as c:
        pass
    assert c.result == {"available": False, "why": "not a CUDA device"}
    assert clocks_text(c.result) == "clocks: not sampled (not a CUDA device)"
    c = ClockSampler(torch.device("cuda", 0), exe=None)
    c.exe = None  # as where shutil.which finds no nvidia-smi
    with c:
        pass
    assert c.result == {"available": False, "why": "nvidia-smi not found"}


def _fake_smi(tmp_path, body: str) -> str:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


@pytest.mark.skipif(os.name != "posix", reason="a fake executable script")
def test_samples_a_fake_nvidia_smi_and_falls_back_to_the_new_reasons_name(tmp_path, monkeypatch):
    """A driver that knows only "clocks_event_reasons.active": the probe finds it;
    the looping query's rows are parsed after the sampler stops it."""
    count = tmp_path / "calls"
    exe = _fake_smi(tmp_path, f"""
        import sys
        q = [a for a in sys.argv if a.startswith("--query-gpu=")][0]
        if "clocks_throttle_reasons" in q:
            print('Field "clocks_throttle_reasons.active" is not a valid field to query.', file=sys.stderr)
            sys.exit(2)
        assert q.endswith(",clocks_event_reasons.active") and "GPU-fake" in sys.argv
        with open({str(count)!r}, "a+") as f:
            f.seek(0)
            n = len(f.read())
            f.write("x")
        if n == 0:   # the probe
            print("1980, 1980, 100, 700, 30, 0x0")
        else:        # the samples: 1600, 1601, 1602, ...
            print(f"{{1599 + n}}, 1980, 690, 700, 60, 0x4")
    """)
    monkeypatch.setattr(gpu_clocks, "_device_id", lambda device: "GPU-fake")
    import time
    with ClockSampler(torch.device("cuda", 0), period_ms=20, exe=exe) as c:
        time.sleep(1.0)
        mid = c.current()   # the summary so far, while it still samples
        assert mid["available"] and mid["sm_mhz_min"] == 1600 and c.result["why"] == "not run"
    r = c.result
    assert c.current() is r
    assert r["available"] and r["samples"] >= 3, r
    assert r["sm_mhz_min"] == 1600 and r["throttle_reasons"] == ["0x4"] and r["power_w_median"] == 690
    assert r["samples"] == len(count.read_text()) - 1   # every sample after the probe was kept


@pytest.mark.skipif(os.name != "posix", reason="a fake executable script")
def test_a_failing_nvidia_smi_is_named(tmp_path, monkeypatch):
    exe = _fake_smi(tmp_path, """
        import sys
        print("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.", file=sys.stderr)
        sys.exit(9)
    """)
    monkeypatch.setattr(gpu_clocks, "_device_id", lambda device: "GPU-fake")
    with ClockSampler(torch.device("cuda", 0), exe=exe) as c:
        pass
    assert c.result["available"] is False
    assert "couldn't communicate with the NVIDIA driver" in c.result["why"]


@pytest.mark.skipif(os.name != "posix", reason="a fake executable script")
def test_a_long_run_keeps_every_second_sample_past_the_cap(tmp_path, monkeypatch):
    """Past max_samples the sampler halves what it holds and doubles its period:
    memory stays bounded over a run of hours and the kept samples still span it
    from its first (1600 MHz) on."""
    count = tmp_path / "calls"
    exe = _fake_smi(tmp_path, f"""
        with open({str(count)!r}, "a+") as f:
            f.seek(0)
            n = len(f.read())
            f.write("x")
        print(f"{{1599 + n}}, 1980, 690, 700, 60, 0x4")
    """)
    monkeypatch.setattr(gpu_clocks, "_device_id", lambda device: "GPU-fake")
    import time
    with ClockSampler(torch.device("cuda", 0), period_ms=10, exe=exe, max_samples=6) as c:
        time.sleep(1.5)
    r = c.result
    calls = len(count.read_text())
    assert calls >= 12, calls                     # the cap was passed at least once
    assert 3 <= r["samples"] <= 6, r              # bounded
    assert c.period_ms > 10                       # and the period grew
    assert r["sm_mhz_min"] == 1600                # the first sample after the probe is kept


@pytest.mark.skipif(os.name != "posix", reason="a fake executable script")
def test_a_closed_gate_keeps_no_samples_and_the_window_is_named(tmp_path, monkeypatch):
    """A run's compile and evaluations leave the card idle at its boost clock:
    samples taken while the gate is closed are dropped, those while it is open kept."""
    state = tmp_path / "mhz"
    state.write_text("1980")
    exe = _fake_smi(tmp_path, f"""
        print(open({str(state)!r}).read().strip() + ", 1980, 690, 700, 60, 0x4")
    """)
    monkeypatch.setattr(gpu_clocks, "_device_id", lambda device: "GPU-fake")
    import time
    with ClockSampler(torch.device("cuda", 0), period_ms=20, exe=exe, window="steps 3 on") as c:
        c.gate = False
        time.sleep(0.5)
        assert c.current() == {"available": False, "why": "no samples in the window (steps 3 on)",
                               "window": "steps 3 on"}
        state.write_text("1500")
        time.sleep(0.2)
        c.gate = True
        time.sleep(0.6)
        c.gate = False
        time.sleep(0.2)
        state.write_text("1980")
        time.sleep(0.5)
    r = c.result
    assert r["available"] and r["samples"] >= 3 and r["window"] == "steps 3 on"
    assert r["sm_mhz_median"] == 1500 and r["sm_mhz_min"] == 1500, r
