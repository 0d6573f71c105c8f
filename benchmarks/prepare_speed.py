"""prepare's wall time with one decoding process and with one per core, on the same photos.

    .venv/bin/python benchmarks/prepare_speed.py [--data ../shared/datasets/hymenoptera] [--repeats 3]

Times `build_manifest` (list, read, hash, decode every file, split) with 1 process and with N (default: the
cores this process may use), alternating 1, N, N, 1, ... so that a drift of the machine's speed cancels, and
prints the median of each and their ratio. Also checks that both wrote the same manifest.

For scale, it also times the machine's own ceiling in the same run: the same pure-Python busy loop run twice
in one process and once in each of N processes (on a shared virtual machine two "cores" rarely give 2x).
"""

from __future__ import annotations

import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import click

from pipeline.core.config import usable_cores
from pipeline.data.manifest import build_manifest

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def busy(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def ceiling_seconds(workers: int, n: int = 3_000_000) -> float:
    """Wall time of `workers` busy loops: in one process when `workers` is 1 (one loop per would-be process)."""
    start = time.perf_counter()
    if workers == 1:
        for _ in range(2):
            busy(n)
    else:
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(busy, [n * 2 // workers] * workers))
    return time.perf_counter() - start


def seconds(data: Path, workers: int) -> tuple[float, list]:
    start = time.perf_counter()
    manifest = build_manifest(data, 0.15, 0.15, seed=0, num_workers=workers)
    return time.perf_counter() - start, manifest.rows


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=DEFAULT_DATA, show_default=True)
@click.option("--workers", type=click.IntRange(min=2), default=max(2, usable_cores()), show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
def main(data: Path, workers: int, repeats: int) -> None:
    seconds(data, 1)  # warm the page cache: both sides then read from memory
    times: dict[int, list[float]] = {1: [], workers: []}
    ceiling: dict[int, list[float]] = {1: [], workers: []}
    rows = {}
    for i in range(repeats):
        for n in (1, workers) if i % 2 == 0 else (workers, 1):
            elapsed, rows[n] = seconds(data, n)
            times[n].append(elapsed)
            ceiling[n].append(ceiling_seconds(n))
    one, many = statistics.median(times[1]), statistics.median(times[workers])
    bound = statistics.median(ceiling[1]) / statistics.median(ceiling[workers])
    click.echo(f"{data}: {len(rows[1])} files, medians of {repeats}")
    click.echo(f"1 process: {one:.2f} s ({len(rows[1]) / one:.0f} files/s)")
    click.echo(f"{workers} processes: {many:.2f} s ({len(rows[1]) / many:.0f} files/s)")
    click.echo(f"speed-up {one / many:.2f}x; same manifest: {rows[1] == rows[workers]}")
    click.echo(f"machine ceiling: busy loops in {workers} processes {bound:.2f}x faster than in 1 (same run)")


if __name__ == "__main__":
    main()
