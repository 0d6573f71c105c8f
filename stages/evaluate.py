"""DVC stage `evaluate@<name>`: score one trained model on the test split."""

from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import user_errors
from pipeline.evaluate import evaluate_head
from pipeline.metrics import write_json

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True)
@click.option("--head", type=PathArg, required=True)
@click.option("--metrics", type=PathArg, required=True)
@click.option("--confusion", type=PathArg, required=True, help="Per-image actual/predicted records (DVC plot).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features: Path, head: Path, metrics: Path, confusion: Path, params: Path) -> None:
    scores, records = evaluate_head(features, head, load_params(params).evaluate.ece_bins)
    write_json(metrics, scores)
    write_json(confusion, records)
    click.echo(
        f"evaluate@{scores['model']}: test accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} "
        f"on {scores['n_test']} images -> {metrics}"
    )


if __name__ == "__main__":
    main()
