"""Run one-GPU benchmark jobs side by side on a machine of several GPUs.

Each job is one command that needs one GPU; the pool gives every running job
its own card (CUDA_VISIBLE_DEVICES), starts the next job as soon as a card is
free, stops any job at its own time limit and starts none that could not end
before --deadline. Every job's output goes to JOBDIR/NAME.log and its results
to the files it writes under JOBDIR (the job sees JOBDIR in its environment);
at the end JOBDIR is packed into one archive (the device tool returns at
most 8 files) and a table of what ran, how long and with which exit status
is printed.

Jobs are lines of a file: `NAME  TIMEOUT_S  COMMAND...`; lines starting with
'#' are comments. Side by side, each job has a whole GPU but shares the host's CPUs:
timings are comparable only between jobs of one run on cards of one kind.

    python benchmarks/gpu_pool.py benchmarks/gpu_jobs.txt --gpus 4 --deadline 560 \
        --out $OUT/jobs.tar.gz [--only NAME ...]
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Job:
    name: str
    timeout: float
    command: str
    status: str = "not started"
    seconds: float = 0.0
    gpu: int | None = None


def read_jobs(path: Path) -> list[Job]:
    jobs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 3:
            sys.exit(f"{path}:{n}: expected 'NAME TIMEOUT_S COMMAND', got {line!r}")
        try:
            timeout = float(parts[1])
        except ValueError:
            sys.exit(f"{path}:{n}: TIMEOUT_S must be a number, got {parts[1]!r}")
        jobs.append(Job(parts[0], timeout, parts[2]))
    names = [j.name for j in jobs]
    dup = {x for x in names if names.count(x) > 1}
    if dup:
        sys.exit(f"{path}: job names repeat: {sorted(dup)}")
    return jobs


def run_pool(jobs: list[Job], gpus: list[int], deadline: float, jobdir: Path, dry: bool = False) -> None:
    t0 = time.time()
    free = list(gpus)
    running: dict[int, tuple[Job, subprocess.Popen, float, object]] = {}
    queue = list(jobs)
    while queue or running:
        now = time.time() - t0
        while queue and free:
            job = queue[0]
            # a second of slack: a job given a deadline of its own length starts
            # (2026-11-28 one was skipped 0.1 s after the pool's start)
            if now + job.timeout > deadline + 1.0:
                # a job that could not finish in time is skipped, not cut short
                queue.pop(0)
                job.status = "skipped (deadline)"
                continue
            queue.pop(0)
            gpu = free.pop(0)
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), JOBDIR=str(jobdir),
                       PYTHONUNBUFFERED="1")
            log = open(jobdir / f"{job.name}.log", "w")
            cmd = "true" if dry else f"timeout -k 10 {int(job.timeout)} bash -c {shlex.quote(job.command)}"
            proc = subprocess.Popen(cmd, shell=True, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            job.gpu, job.status = gpu, "running"
            running[proc.pid] = (job, proc, time.time(), log)
            print(f"[{now:6.0f}s] start {job.name} on GPU {gpu}", flush=True)
        done = [pid for pid, (_, p, _, _) in running.items() if p.poll() is not None]
        for pid in done:
            job, proc, started, log = running.pop(pid)
            log.close()
            job.seconds = time.time() - started
            rc = proc.returncode
            job.status = "ok" if rc == 0 else ("timed out" if rc in (124, 137) else f"exit {rc}")
            free.append(job.gpu)
            print(f"[{time.time() - t0:6.0f}s] {job.status:10} {job.name} ({job.seconds:.0f} s)", flush=True)
        if not done:
            time.sleep(0.5 if not dry else 0.01)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jobs", type=Path)
    ap.add_argument("--gpus", type=int, default=None, help="cards to use (default: all visible)")
    ap.add_argument("--deadline", type=float, default=560, help="seconds: start no job that could end later")
    ap.add_argument("--jobdir", type=Path, default=Path("/tmp/gpu-jobs"))
    ap.add_argument("--out", type=Path, help="archive of JOBDIR (.tar.gz)")
    ap.add_argument("--only", nargs="+", help="run only these job names, in the order given here")
    ap.add_argument("--dry-run", action="store_true", help="schedule with no-op commands")
    args = ap.parse_args(argv)
    jobs = read_jobs(args.jobs)
    if args.only:
        unknown = set(args.only) - {j.name for j in jobs}
        if unknown:
            ap.error(f"--only: no such job(s) {sorted(unknown)} in {args.jobs}")
        # the order given, not the file's: a call puts its longest or most needed jobs first
        by_name = {j.name: j for j in jobs}
        jobs = [by_name[name] for name in dict.fromkeys(args.only)]
    n = args.gpus
    if n is None:
        import torch
        n = torch.cuda.device_count()
    if n < 1:
        ap.error("no GPUs (pass --gpus N)")
    args.jobdir.mkdir(parents=True, exist_ok=True)
    run_pool(jobs, list(range(n)), args.deadline, args.jobdir, dry=args.dry_run)
    print(f"\n{'job':24} {'gpu':>3} {'seconds':>8}  status")
    for j in jobs:
        print(f"{j.name:24} {'' if j.gpu is None else j.gpu:>3} {j.seconds:>8.0f}  {j.status}")
    if args.out:
        with tarfile.open(args.out, "w:gz") as tar:
            tar.add(args.jobdir, arcname=args.jobdir.name)
        print(f"archive: {args.out}")
    return 0 if all(j.status == "ok" for j in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
