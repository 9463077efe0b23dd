"""`megacpp train --profile START:END`: a profiler table of those steps in the run dir."""
from __future__ import annotations

import re
import subprocess
import sys

import megacpp
from megacpp.train.trainer import Trainer

from train_testutil import tiny_sets


def test_profile_window_writes_table(tiny_snapshot, tmp_path):
    recipe = megacpp.load_recipe("nam-tiny", tiny_sets(**{"policy.eval_batches": 0}))
    Trainer(recipe, tmp_path / "run", tiny_snapshot, device="cpu", quiet=True, max_steps=3,
            profile=(1, 10)).run()  # the run ends inside the window: the table is still written
    text = (tmp_path / "run" / "profile.txt").read_text()
    assert text.startswith("steps 1..2, rank 0, cpu")
    m = re.search(r"wall ([0-9.]+) ms \(([0-9.]+) ms/step\)", text.splitlines()[0])
    assert m and float(m.group(1)) > 0 and abs(float(m.group(2)) - float(m.group(1)) / 2) < 0.2
    assert "by self CPU time" in text and "aten::" in text


def test_profile_bad_window_is_one_clear_error(tmp_path):
    p = subprocess.run([sys.executable, "-m", "megacpp", "train", "--recipe", "nam-tiny", "--out",
                        str(tmp_path / "r"), "--profile", "5"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--profile: expected START:END" in p.stderr
    assert "Traceback" not in p.stderr
