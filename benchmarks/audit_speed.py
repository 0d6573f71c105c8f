"""Time the cross-split near-duplicate search on a synthetic store the size of a real one, and its memory.

    python benchmarks/audit_speed.py [--rows 50000] [--dim 1280] [--copies 200] [--threshold 0.95]

Features are random non-negative vectors, split 70/15/15 train/val/test: post-ReLU pooled embeddings are
non-negative too, so distinct rows have a positive cosine (about 0.75 here, in a narrow band; real photos' spread
over 0.4-0.8). `--copies` val and test rows are replaced by a train row plus 5% noise (cosine ~0.999): the pairs
that must be found. Memory: the process's maximum resident set (ru_maxrss) before and after the search, and the
peak of what numpy and scikit-learn allocated during it (tracemalloc; BLAS workspace is not traced).
"""

from __future__ import annotations

import resource
import time
import tracemalloc

import click
import numpy as np

from pipeline.features.store import FeatureStore
from pipeline.results.audit import cross_split_duplicates


def synthetic_store(rows: int, dim: int, copies: int, seed: int = 0) -> tuple[FeatureStore, set[tuple[str, str]]]:
    """A store of random rows with `copies` planted near-copies across splits, and the planted (a, b) paths."""
    rng = np.random.default_rng(seed)
    features = rng.random((rows, dim), dtype=np.float32)
    split = np.zeros(rows, dtype=np.uint8)
    split[int(0.70 * rows) : int(0.85 * rows)] = 1
    split[int(0.85 * rows) :] = 2
    train, later = np.flatnonzero(split == 0), np.flatnonzero(split > 0)
    sources = rng.choice(train, copies, replace=False)
    targets = rng.choice(later, copies, replace=False)
    noise = rng.normal(scale=0.05 * features.std(), size=(copies, dim)).astype(np.float32)
    features[targets] = features[sources] + noise
    store = FeatureStore(
        features=features,
        labels=rng.integers(0, 2, rows),
        split=split,
        paths=[f"img/{i:06d}.jpg" for i in range(rows)],
        sha256=[f"{i:064x}" for i in range(rows)],
        attrs={"classes": ["a", "b"]},
    )
    return store, {(store.paths[s], store.paths[t]) for s, t in zip(sources, targets, strict=True)}


@click.command()
@click.option("--rows", default=50_000, show_default=True)
@click.option("--dim", default=1280, show_default=True)
@click.option("--copies", default=200, show_default=True)
@click.option("--threshold", default=0.95, show_default=True)
def main(rows: int, dim: int, copies: int, threshold: float) -> None:
    store, planted = synthetic_store(rows, dim, copies)
    sizes = store.split_sizes()
    print(f"rows {rows:,} x {dim} float32 ({store.features.nbytes / 2**20:,.0f} MiB), split {sizes}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    start = time.perf_counter()
    pairs = cross_split_duplicates(store, threshold)
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    found = {(p.path_a, p.path_b) for p in pairs}
    print(f"threshold {threshold}: {len(pairs)} pairs in {seconds:.1f} s")
    print(f"peak RSS {before:,.0f} MiB before the search, {after:,.0f} MiB after")
    print(f"peak traced allocation during the search: {traced_peak / 2**20:,.0f} MiB")
    print(f"planted copies found: {len(planted & found)}/{len(planted)}; other pairs: {len(found - planted)}")
    lowest = min((p.similarity for p in pairs if (p.path_a, p.path_b) in planted), default=float("nan"))
    print(f"lowest similarity among planted copies: {lowest:.4f}")


if __name__ == "__main__":
    main()
