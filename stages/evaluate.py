"""DVC stage `evaluate@<head>`: score one trained head on its feature store's test split."""

from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import user_errors
from pipeline.evaluate import evaluate_head
from pipeline.metrics import write_model_metrics

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, required=True, help="Feature store the head was trained on.")
@click.option("--head", type=PathArg, required=True, help="A trained head.")
@click.option(
    "--out", type=PathArg, required=True, help="Folder for metrics.json, predictions.csv, the confusion plot."
)
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features: Path, head: Path, out: Path, params: Path) -> None:
    scored = evaluate_head(features, head, load_params(params).evaluate)
    write_model_metrics(out, scored)
    scores = scored.record
    click.echo(
        f"evaluate@{scores['model']}: test accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} "
        f"on {scores['n_test']} images -> {out / 'metrics.json'}"
    )


if __name__ == "__main__":
    main()
