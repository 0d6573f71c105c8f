"""The exact cosine search with and without its bfloat16 candidate pass (pipeline.heads.neighbors): time and answers.

    python benchmarks/search_speed.py STORE [--queries 15000] [--k 50] [--threshold 0.84]

STORE: a feature store (e.g. benchmarks/scale.py's data/features/synthetic.h5, kept with --keep). Its val rows (the
first --queries of them) are searched against its train rows, as the knn head's grid searches them: top_k at --k,
then every pair at or above --threshold (the audit's near-copy search), each once with bf16=False (float32 products
alone) and once with bf16=True (bfloat16 candidates, float32 for the pairs the error bound keeps). Prints lines:

    search_speed: kind=top_k queries=Q reference=R k=K float32_s=S bf16_s=S same_positions=F same_rows=F
        max_cosine_diff=D  (one line)
    search_speed: kind=pairs queries=Q reference=R threshold=T float32_s=S bf16_s=S pairs=N same=True|False

same_positions: the share of (query, rank) positions holding the same neighbour; where they differ, two cosines
equal to float32 rounding ranked either way (the float32 pass sums a pair's product in another order than a matrix
product), which max_cosine_diff bounds. The bfloat16 pass pays where the CPU multiplies bfloat16 natively
(pipeline.core.accelerator.cpu_multiplies_bf16, printed); elsewhere torch emulates it, slower than float32.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import numpy as np

from pipeline.core.accelerator import cpu_multiplies_bf16
from pipeline.features.store import read_store
from pipeline.heads.neighbors import pairs_at_least, top_k


def timed(run):
    start = time.perf_counter()
    answer = run()
    return answer, time.perf_counter() - start


@click.command()
@click.argument("store", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--queries", default=15000, show_default=True)
@click.option("--k", default=50, show_default=True)
@click.option("--threshold", default=0.84, show_default=True)
def main(store: Path, queries: int, k: int, threshold: float) -> None:
    features = read_store(store)
    x, train, val = features.features, features.rows("train"), features.rows("val")[:queries]
    click.echo(f"search_speed: cpu_multiplies_bf16={cpu_multiplies_bf16()}")
    size = f"queries={len(val)} reference={len(train)}"
    plain, plain_s = timed(lambda: top_k(x, x, k, query_rows=val, reference_rows=train, bf16=False))
    fast, fast_s = timed(lambda: top_k(x, x, k, query_rows=val, reference_rows=train, bf16=True))
    same = plain[1] == fast[1]
    click.echo(
        f"search_speed: kind=top_k {size} k={k} float32_s={plain_s:.1f} bf16_s={fast_s:.1f} "
        f"same_positions={same.mean():.6f} same_rows={same.all(axis=1).mean():.5f} "
        f"max_cosine_diff={np.abs(plain[0] - fast[0]).max():.2e}"
    )
    plain, plain_s = timed(lambda: pairs_at_least(x, x, threshold, query_rows=val, reference_rows=train, bf16=False))
    fast, fast_s = timed(lambda: pairs_at_least(x, x, threshold, query_rows=val, reference_rows=train, bf16=True))
    identical = all(np.array_equal(a, b) for a, b in zip(plain[:2], fast[:2], strict=True))
    click.echo(
        f"search_speed: kind=pairs {size} threshold={threshold} float32_s={plain_s:.1f} bf16_s={fast_s:.1f} "
        f"pairs={len(plain[0])} same={identical}"
    )


if __name__ == "__main__":
    main()
