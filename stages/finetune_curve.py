"""DVC stage `finetune_curve`: test accuracy of fine-tuning on subsets of the training images (when asked)."""

from pathlib import Path

import click

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import write_json
from pipeline.finetuning.curve import finetune_curve

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--work", type=PathArg, required=True, help="Subsets, models and checkpoints, outside DVC's outputs.")
@click.option("--out", type=PathArg, required=True, help="The curve (DVC plot data, JSON); empty when not asked for.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(data: Path, manifest: Path, work: Path, out: Path, params: Path) -> None:
    p = load_params(params)
    sizes = p.finetune_curve.sizes
    entry = p.finetune_backbone
    points = finetune_curve(manifest, data, entry.backbone, p.finetune, sizes, work, weights=entry.weights_path)
    write_json(out, points)
    click.echo(f"finetune_curve: {len(points)} fine-tuning runs ({sizes or 'finetune_curve.sizes is empty'}) -> {out}")


if __name__ == "__main__":
    main()
