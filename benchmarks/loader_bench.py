"""PackedLoader throughput on CPU: tokens per second delivered as training batches.

    .venv/bin/python benchmarks/loader_bench.py [--snapshot DIR] [--seconds 3]

Without --snapshot it prepares a small synthetic snapshot in a temporary
directory (seq_len 256 and 1024). Prints one table: for each (seq_len,
batch size) the tokens/s of a full consumer loop (prefetch thread, batch
assembly, tensors handed to the caller) and of the batch assembly alone.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from megacpp.data.loader import PackedLoader, make_batch, open_snapshot, read_split
from megacpp.data.prepare import PrepareConfig, prepare_snapshot

_WORDS = "alpha beta gamma delta node tree graph edge buffer stream parse token value index count".split()


def _synthetic_tree(root: Path, files: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        funcs = []
        for _ in range(rng.randrange(5, 30)):
            name = f"{rng.choice(_WORDS)}_{rng.randrange(100000)}"
            funcs.append(
                f"int {name}(const std::vector<int>& v) {{\n"
                f"  int acc = {rng.randrange(100)};\n"
                f"  for (auto x : v) acc += x * {rng.randrange(2, 99)};  // {rng.choice(_WORDS)}\n"
                f"  return acc;\n}}\n"
            )
        (root / f"f{i}.cpp").write_text("#include <vector>\n\n" + "\n".join(funcs))
    return root


def _measure(loader: PackedLoader, seconds: float) -> float:
    tokens, start = 0, time.perf_counter()
    it = iter(loader)
    while time.perf_counter() - start < seconds:
        batch = next(it)
        tokens += batch["input_ids"].numel()
    elapsed = time.perf_counter() - start
    loader.close()
    return tokens / elapsed


def _measure_assembly(snapshot_dir: Path, batch_size: int, seconds: float) -> float:
    snap = open_snapshot(snapshot_dir, verify=False)
    cols = read_split(snap, "train")
    rng = np.random.default_rng(0)
    n = cols["tokens"].shape[0]
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pick = rng.integers(0, n, batch_size)
        b = make_batch(cols["tokens"][pick], cols["doc_index"][pick], cols["positions"][pick])
        tokens += b["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--snapshot", type=Path, help="an existing snapshot (default: build a synthetic one)")
    ap.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    ap.add_argument("--batch-sizes", default="8,32,128")
    args = ap.parse_args()
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.snapshot:
            snapshots = [args.snapshot]
        else:
            tree = _synthetic_tree(Path(tmp) / "src", files=400)
            snapshots = []
            for seq_len in (256, 1024):
                cfg = PrepareConfig(vocab_size=2048, seq_len=seq_len, max_bytes=0, split=(0.9, 0.05, 0.05))
                snapshots.append(prepare_snapshot(Path(tmp) / f"s{seq_len}", [f"dir:{tree}"], cfg).path)
        print(f"{'seq_len':>7} {'batch':>5} {'train rows':>10} {'loader tok/s':>13} {'assembly tok/s':>15}")
        for snap_dir in snapshots:
            snap = open_snapshot(snap_dir, verify=False)
            for bs in sizes:
                loader = PackedLoader(snap_dir, "train", batch_size=bs, seed=0, verify=False)
                full = _measure(loader, args.seconds)
                bare = _measure_assembly(snap_dir, bs, args.seconds / 2)
                print(f"{snap.seq_len:>7} {bs:>5} {snap.split_rows['train']:>10} {full / 1e6:>11.2f} M {bare / 1e6:>13.2f} M")
    return 0


if __name__ == "__main__":
    sys.exit(main())
