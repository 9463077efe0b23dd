"""Metrics sinks: metrics.jsonl (always), TensorBoard events, console lines.

On a terminal the console shows a progress bar with ETA (tqdm); in CI logs
(not a TTY) it prints plain lines every log interval.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path


class MetricsWriter:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int = 0, quiet: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        self.tb = None
        self.tb_error = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(run_dir / "tb"))
        except Exception as e:  # tensorboard missing: jsonl still has everything
            self.tb_error = str(e)
        self.quiet = quiet
        self.bar = None
        if sys.stderr.isatty() and not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self.t0 = time.time()

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        step = record.get("step", 0)
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def console(self, step: int, text: str, advance: int = 0) -> None:
        if self.bar:
            self.bar.update(advance)
            self.bar.set_postfix_str(text)
        elif not self.quiet:
            print(f"step {step}: {text}", flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.flush()
            self.tb.close()
        self.file.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a kill
    return out
