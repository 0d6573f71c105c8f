"""DVC stage `extract`: frozen backbone over the manifest's usable images -> HDF5 feature store."""

from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import user_errors
from pipeline.extract import extract
from pipeline.io import write_json

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--out", type=PathArg, required=True, help="Feature store to write (HDF5).")
@click.option("--cache-dir", type=PathArg, required=True, help="Embedding cache, outside DVC's outputs.")
@click.option("--metrics", type=PathArg, required=True)
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(data: Path, manifest: Path, out: Path, cache_dir: Path, metrics: Path, params: Path) -> None:
    result = extract(manifest, data, out, cache_dir, load_params(params).extract)
    write_json(metrics, result.metrics())
    click.echo(
        f"extract: {result.images} images ({result.computed} computed, {result.reused} reused) on "
        f"{result.device} ({result.precision}) in {result.seconds:.1f}s -> {out}"
    )


if __name__ == "__main__":
    main()
