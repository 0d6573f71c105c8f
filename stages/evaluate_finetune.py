"""DVC stage `evaluate_finetune`: score the fine-tuned network on the manifest's test split."""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.results.metrics import write_model_metrics
from pipeline.results.scoring_finetuned import evaluate_finetuned

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--finetuned", type=PathArg, required=True, help="The fine-tuned model folder.")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option(
    "--out", type=PathArg, required=True, help="Folder for metrics.json, predictions.csv, the confusion plot."
)
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(finetuned: Path, manifest: Path, data: Path, out: Path, params: Path) -> None:
    p = load_params(params)
    scored = evaluate_finetuned(finetuned, manifest, data, params=p.finetune, scoring=p.evaluate)
    click.echo(f"evaluate_finetune: {write_model_metrics(out, scored)}")


if __name__ == "__main__":
    main()
