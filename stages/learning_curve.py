"""DVC stage `learning_curve`: test accuracy of the head chosen on val against training images per class."""

from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.curves import best_on_val, learning_curve
from pipeline.errors import user_errors
from pipeline.heads import load_head
from pipeline.io import write_json
from pipeline.store import read_store

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True)
@click.option("--heads", type=PathArg, required=True, help="Folder of trained heads (<name>.h5).")
@click.option("--out", type=PathArg, required=True, help="The curve (DVC plot data, JSON).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features: Path, heads: Path, out: Path, params: Path) -> None:
    p = load_params(params)
    store = read_store(features)
    best = best_on_val([load_head(heads / f"{name}.h5", store) for name in p.heads])
    points = learning_curve(store, best, p.learning_curve.sizes, p.learning_curve.seeds)
    write_json(out, points)
    click.echo(f"learning_curve: {best.name} (chosen on val) at {len(points)} sizes -> {out}")


if __name__ == "__main__":
    main()
