"""DVC stage `finetune`: new output layer on the backbone, last blocks unfrozen, trained end to end."""

from dataclasses import replace
from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.errors import user_errors
from pipeline.finetune import FinetuneError, check_warm_start, finetune
from pipeline.heads import load_head
from pipeline.metrics import write_json
from pipeline.store import read_attrs

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--head", type=PathArg, required=True, help="Trained logistic head for the warm start.")
@click.option("--features", type=PathArg, help="The feature store the head was trained on (for the warm start).")
@click.option("--out", type=PathArg, required=True, help="Directory for model.safetensors and config.json.")
@click.option("--checkpoints", type=PathArg, required=True, help="Checkpoint cache, outside DVC's outputs.")
@click.option("--history", type=PathArg, required=True, help="Per-epoch losses and accuracies (DVC plot).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(
    data: Path,
    manifest: Path,
    head: Path,
    features: Path | None,
    out: Path,
    checkpoints: Path,
    history: Path,
    params: Path,
) -> None:
    p = load_params(params)
    # Fine-tune on the inputs the frozen features were computed from, unless told otherwise.
    f = replace(p.finetune, image_size=p.finetune.image_size or p.extract.image_size)
    warm = None
    if f.init_head == "logreg":
        if not head.is_file():
            raise FinetuneError(f"finetune.init_head is logreg but {head} does not exist; train it or use random")
        if features is None:
            raise FinetuneError("finetune.init_head is logreg: give --features, the store the head was trained on")
        warm = load_head(head)
        check_warm_start(warm, read_attrs(features), p.extract.backbone, f.image_size, p.extract.weights)
    weights = Path(p.extract.weights) if p.extract.weights else None
    result = finetune(manifest, data, p.extract.backbone, f, out, checkpoints, warm, head, weights)
    write_json(history, result.history)
    resumed = f", resumed at epoch {result.resumed_from_epoch + 1}" if result.resumed_from_epoch else ""
    click.echo(
        f"finetune: {result.epochs_run} epochs{resumed} (best {result.best_epoch}, val accuracy "
        f"{result.history[result.best_epoch - 1]['val_accuracy']:.4f}), {result.trainable_params:,} of "
        f"{result.total_params:,} parameters trained in {result.train_seconds:.1f}s on {result.device} -> {out}"
    )


if __name__ == "__main__":
    main()
