"""DVC stages `evaluate@<head>` and `evaluate_finetune`: score one trained model on the test split."""

from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import PipelineError, user_errors
from pipeline.evaluate import evaluate_finetuned, evaluate_head
from pipeline.metrics import write_json

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--features", type=PathArg, help="Feature store the head was trained on (with --head).")
@click.option("--head", type=PathArg, help="A trained head.")
@click.option("--finetuned", type=PathArg, help="A fine-tuned model directory (with --manifest and --data).")
@click.option("--manifest", type=PathArg)
@click.option("--data", type=PathArg)
@click.option("--metrics", type=PathArg, required=True)
@click.option("--confusion", type=PathArg, required=True, help="Per-image actual/predicted records (DVC plot).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(features, head, finetuned, manifest, data, metrics: Path, confusion: Path, params: Path) -> None:
    p = load_params(params)
    if head and features and not finetuned:
        scores, records = evaluate_head(features, head, p.evaluate.ece_bins)
    elif finetuned and manifest and data and not head:
        f = p.finetune
        scores, records = evaluate_finetuned(
            finetuned, manifest, data, p.evaluate.ece_bins, f.batch_size, f.num_workers, f.device, f.precision
        )
    else:
        raise PipelineError("give either --head and --features, or --finetuned with --manifest and --data")
    write_json(metrics, scores)
    write_json(confusion, records)
    click.echo(
        f"evaluate@{scores['model']}: test accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f} "
        f"on {scores['n_test']} images -> {metrics}"
    )


if __name__ == "__main__":
    main()
