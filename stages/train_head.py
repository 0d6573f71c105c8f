"""DVC stage `train_head@<name>`: one head on the cached features, its grid chosen on held-out rows."""

from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import user_errors
from pipeline.heads import HeadError, save_head
from pipeline.io import write_json
from pipeline.selection import check_head_params, train_head
from pipeline.store import read_store

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--name", required=True, help="The head's key under `heads` in params.yaml.")
@click.option("--features", type=PathArg, required=True)
@click.option("--out", type=PathArg, required=True)
@click.option("--curve", type=PathArg, required=True, help="Validation curve (DVC plot data, JSON).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(name: str, features: Path, out: Path, curve: Path, params: Path) -> None:
    heads = load_params(params).heads
    if name not in heads:
        raise HeadError(f"no head '{name}' under heads in {params}; defined: {', '.join(heads)}")
    check_head_params(name, heads[name])  # a misconfigured head fails before the store is read
    head = train_head(read_store(features), name, heads[name])
    save_head(head, out)
    write_json(curve, head.val_curve)
    click.echo(
        f"train_head@{name}: {head.kind} with {head.hyperparameters}, chosen on {head.selection}, "
        f"in {head.fit_seconds:.1f}s -> {out}"
    )


if __name__ == "__main__":
    main()
