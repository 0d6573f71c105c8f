"""The one clock of inference costs: milliseconds per row, the median of a few timed calls after a warm-up."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms_per_row(run: Callable[[], object], n_rows: int, repeats: int = 5) -> float:
    """Median milliseconds per row of `repeats` timed calls of `run`, after one untimed call (the first pays for
    allocations, caches and lazy set-up); the median, so that one call slowed by the machine does not count.

    `run` returns once its work is done: one that launches GPU work waits for it.
    """
    run()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return 1000 * statistics.median(seconds) / max(1, n_rows)
