"""Time LogME (pipeline/features/transferability.py) on synthetic features the size of real stores.

    python benchmarks/logme_speed.py [--shape 50000x1280 --shape 10000x2048] [--classes 10] [--chunk 10000]

Features are float32, unit Gaussian noise plus a class mean of scale 0.3 (so the labels are learnable but far
from separable), generated chunk by chunk and streamed into `EvidenceStats` the way a stage reads a store: the
accumulate time covers `add` only (F^T F, F^T Y and the counts in float64), not drawing the numbers. The solve
is split into the one eigendecomposition of F^T F (D x D) and the per-class fixed point of Algorithm 1. The load
average is printed because BLAS/LAPACK timings on a shared machine move with it.
"""

from __future__ import annotations

import os
import time

import click
import numpy as np

from pipeline.features.transferability import EvidenceStats


def parse_shape(text: str) -> tuple[int, int]:
    """'50000x1280' -> (50000, 1280)."""
    rows, _, dims = text.lower().partition("x")
    return int(rows), int(dims)


def accumulate(rows: int, dims: int, classes: int, chunk: int, seed: int = 0) -> tuple[EvidenceStats, float]:
    """Stream `rows` synthetic rows into an EvidenceStats; return it and the seconds spent in `add`."""
    rng = np.random.default_rng(seed)
    means = (0.3 * rng.normal(size=(classes, dims))).astype(np.float32)
    stats = EvidenceStats(num_classes=classes)
    spent = 0.0
    for start in range(0, rows, chunk):
        labels = rng.integers(0, classes, min(chunk, rows - start))
        features = rng.standard_normal((len(labels), dims), dtype=np.float32) + means[labels]
        began = time.perf_counter()
        stats.add(features, labels)
        spent += time.perf_counter() - began
    return stats, spent


@click.command()
@click.option("--shape", "shapes", multiple=True, default=["50000x1280", "10000x2048"], show_default=True)
@click.option("--classes", default=10, show_default=True)
@click.option("--chunk", default=10_000, show_default=True, help="rows per add() call")
def main(shapes: tuple[str, ...], classes: int, chunk: int) -> None:
    print(f"cores {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}, numpy {np.__version__}")
    print(
        f"{'rows':>8} {'dims':>5} {'classes':>7} {'accumulate s':>12} {'eigh s':>7} {'fixed point s':>13} "
        f"{'max steps':>9} {'LogME':>8}"
    )
    for text in shapes:
        rows, dims = parse_shape(text)
        stats, accumulate_s = accumulate(rows, dims, classes, chunk)
        began = time.perf_counter()
        spectrum = stats.spectrum()
        eigh_s = time.perf_counter() - began
        began = time.perf_counter()
        evidences = spectrum.maximise()
        solve_s = time.perf_counter() - began
        score = float(np.mean([e.log_evidence for e in evidences]) / stats.n)
        steps = max(e.iterations for e in evidences)
        print(
            f"{rows:>8,} {dims:>5} {classes:>7} {accumulate_s:>12.2f} {eigh_s:>7.2f} {solve_s:>13.4f} "
            f"{steps:>9} {score:>8.4f}"
        )


if __name__ == "__main__":
    main()
