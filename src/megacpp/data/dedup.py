"""Near-duplicate detection: MinHash signatures over token shingles, banded LSH.

A document becomes the set of its k-token shingles (tokens: identifiers,
numbers, single punctuation characters; whitespace and layout ignored). Its
MinHash signature has `num_perm` values; LSH splits it into `bands` bands and
any two documents that agree on a whole band are candidates. A candidate pair
is a near-duplicate when the fraction of equal signature values (the Jaccard
estimate) is at least `threshold`. Pairs are merged into groups (union-find);
a group is named by its first member's index.

Everything is seeded and order-independent of Python's hash randomisation, so
groups are the same on every run.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass

import numpy as np

_TOKEN = re.compile(r"\w+|[^\w\s]")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass(frozen=True)
class MinHashConfig:
    threshold: float = 0.8  # estimated Jaccard at or above which two documents are near-duplicates
    num_perm: int = 128
    bands: int = 32
    shingle: int = 5  # tokens per shingle
    seed: int = 0

    def to_json(self) -> dict:
        return {"method": "minhash-lsh", "tokens": _TOKEN.pattern, **asdict(self)}


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads shingle hashes over all 64 bits."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """Unique 64-bit hashes of the document's k-token shingles (at least one)."""
    tokens = _TOKEN.findall(text)
    h = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=len(tokens))
    if h.size == 0:
        return np.zeros(1, dtype=np.uint64)
    k = min(k, h.size)
    n = h.size - k + 1
    acc = np.zeros(n, dtype=np.uint64)
    # Polynomial combination of k token hashes; wrap-around multiply is intended.
    for j in range(k):
        acc = acc * np.uint64(0x100000001B3) + h[j : j + n]
    return np.unique(_mix(acc))


def signatures(texts: list[str], config: MinHashConfig) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash signatures."""
    rng = np.random.Generator(np.random.PCG64(config.seed))
    a = rng.integers(1, 2**63, size=config.num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = rng.integers(0, 2**63, size=config.num_perm, dtype=np.uint64)
    out = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    batch: list[np.ndarray] = []
    first = 0

    def flush(end: int) -> None:
        if not batch:
            return
        flat = np.concatenate(batch)
        starts = np.cumsum([0] + [x.size for x in batch[:-1]])
        for lo in range(0, config.num_perm, 16):
            hi = min(lo + 16, config.num_perm)
            # Multiply-shift hashing: the top 32 bits of a*x + b are a universal family.
            vals = (a[lo:hi, None] * flat[None, :] + b[lo:hi, None]) >> np.uint64(32)
            out[first:end, lo:hi] = np.minimum.reduceat(vals, starts, axis=1).T
        batch.clear()

    pending = 0
    with np.errstate(over="ignore"):
        for i, text in enumerate(texts):
            sh = shingle_hashes(text, config.shingle)
            batch.append(sh)
            pending += sh.size
            if pending >= 1 << 19:
                flush(i + 1)
                first, pending = i + 1, 0
        flush(len(texts))
    return out


def near_duplicate_groups(texts: list[str], config: MinHashConfig) -> list[int]:
    """For each document, the index of the first document of its near-duplicate group."""
    n = len(texts)
    if n == 0:
        return []
    sig = signatures(texts, config)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def similar(i: int, j: int) -> bool:
        return float(np.mean(sig[i] == sig[j])) >= config.threshold

    rows = config.num_perm // config.bands
    for band in range(config.bands):
        part = np.ascontiguousarray(sig[:, band * rows : (band + 1) * rows])
        keys = part.view(np.dtype((np.void, part.dtype.itemsize * rows))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        if counts.max() < 2:
            continue
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(counts)[:-1]
        for members in np.split(order, bounds):
            if members.size < 2:
                continue
            # Compare with the bucket's first member and the previous one: linear in bucket size.
            head = int(members[0])
            for prev, cur in zip(members[:-1], members[1:]):
                cur = int(cur)
                for other in {head, int(prev)}:
                    ra, rb = find(cur), find(other)
                    if ra != rb and similar(cur, other):
                        parent[max(ra, rb)] = min(ra, rb)
    return [find(i) for i in range(n)]
