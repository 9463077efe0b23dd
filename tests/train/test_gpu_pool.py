"""benchmarks/gpu_pool.py: one card per job, next job on the first free card,
jobs that cannot end before the deadline skipped, outputs under JOBDIR."""
from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_pool  # noqa: E402


def test_pool_runs_jobs_on_free_cards_and_skips_past_deadline(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text(
        "# comment\n"
        "a 20 echo $CUDA_VISIBLE_DEVICES > $JOBDIR/a.txt\n"
        "b 20 sleep 0.3; echo $CUDA_VISIBLE_DEVICES > $JOBDIR/b.txt\n"
        "c 20 echo $CUDA_VISIBLE_DEVICES > $JOBDIR/c.txt; exit 3\n"
        "late 999 echo never > $JOBDIR/late.txt\n")
    jobdir, out = tmp_path / "jd", tmp_path / "o.tar.gz"
    rc = gpu_pool.main([str(jobs), "--gpus", "2", "--deadline", "60", "--jobdir", str(jobdir),
                        "--out", str(out)])
    assert rc == 1  # c failed, late skipped
    cards = {n: (jobdir / f"{n}.txt").read_text().strip() for n in "abc"}
    assert cards["a"] == "0" and cards["b"] == "1"  # one card each
    assert cards["c"] == "0"  # a's card, free again first
    assert not (jobdir / "late.txt").exists()
    with tarfile.open(out) as tar:
        assert "jd/a.txt" in tar.getnames()


def test_pool_rejects_malformed_lines(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a notanumber echo\n")
    with pytest.raises(SystemExit, match="TIMEOUT_S"):
        gpu_pool.read_jobs(jobs)


def test_only_runs_the_named_jobs_in_the_order_given(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a 20 echo a >> $JOBDIR/order.txt\n"
                    "b 20 echo b >> $JOBDIR/order.txt\n"
                    "c 20 echo c >> $JOBDIR/order.txt\n")
    jobdir = tmp_path / "jd"
    rc = gpu_pool.main([str(jobs), "--gpus", "1", "--deadline", "60", "--jobdir", str(jobdir),
                        "--only", "c", "a"])
    assert rc == 0
    assert (jobdir / "order.txt").read_text().split() == ["c", "a"]


def test_a_job_as_long_as_the_deadline_still_starts(tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("alone 30 echo ran > $JOBDIR/alone.txt\n")
    jobdir = tmp_path / "jd"
    assert gpu_pool.main([str(jobs), "--gpus", "1", "--deadline", "30", "--jobdir", str(jobdir)]) == 0
    assert (jobdir / "alone.txt").read_text().strip() == "ran"
