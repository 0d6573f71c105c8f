"""DVC stage `extract@<label>`: one backbone of extract.backbones, frozen, over the manifest's usable images -> its
HDF5 feature store; its transferability score (LogME) as a metric, its extraction cost and feature size beside it."""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_record
from pipeline.features.extraction import METRIC_KEYS, extract

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--backbone", "label", required=True, help="The entry's label under extract.backbones.")
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--out", type=PathArg, required=True, help="Feature store to write (HDF5).")
@click.option("--cache-dir", type=PathArg, required=True, help="Embedding cache, outside DVC's outputs.")
@click.option("--metrics", type=PathArg, required=True, help="Folder for metrics.json (LogME) and details.json.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(label: str, data: Path, manifest: Path, out: Path, cache_dir: Path, metrics: Path, params: Path) -> None:
    result = extract(manifest, data, out, cache_dir, load_params(params).extract, label)
    write_record(metrics, result.record(), METRIC_KEYS)
    click.echo(
        f"extract@{label}: {result.backbone} at {result.image_size} px ({result.size_reason}); {result.images} "
        f"images ({result.computed} computed, {result.reused} reused) on {result.device} ({result.precision}) in "
        f"{result.seconds:.1f}s; {result.feature_dim} features, LogME {result.logme:.4f} -> {out}"
    )


if __name__ == "__main__":
    main()
