"""DVC stage `prepare`: ImageFolder -> manifest with a seeded split, and a quarantine list."""

import time
from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.data.manifest import build_manifest, write_manifest, write_quarantine

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--data", type=PathArg, required=True, help="ImageFolder root (read only).")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--quarantine", type=PathArg, required=True)
@click.option("--metrics", type=PathArg, required=True)
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(data: Path, manifest: Path, quarantine: Path, metrics: Path, params: Path) -> None:
    start = time.perf_counter()
    p = load_params(params).prepare
    result = build_manifest(
        data,
        p.val_fraction,
        p.test_fraction,
        p.seed,
        num_workers=p.num_workers,
        on_cross_split_duplicate=p.on_cross_split_duplicate,
    )
    write_manifest(result, manifest)
    write_quarantine(result, quarantine)
    counts = result.counts()
    write_json(metrics, {**counts, "layout": result.layout, "seconds": round(time.perf_counter() - start, 2)})
    click.echo(
        f"prepare: {counts['ok']} images in {counts['classes']} classes ({result.layout} layout; "
        f"train {counts['n_train']} / val {counts['n_val']} / test {counts['n_test']}), "
        f"{counts['quarantined']} quarantined, {counts['cross_split_duplicates']} cross-split duplicates, "
        f"in {time.perf_counter() - start:.1f}s ({p.num_workers} processes) -> {manifest}"
    )


if __name__ == "__main__":
    main()
