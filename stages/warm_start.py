"""DVC stage `warm_start`: the fine-tuned network's new layer as it starts, seeded random or from the logistic head
(its chosen C fitted on the train split alone: the val split judges fine-tuning and WiSE-FT).

Its own stage so that the DAG says what fine-tuning reads: with `finetune.init_head: random` this writes the same
bytes whatever the logistic head, and DVC then has no reason to rerun fine-tuning when that head changes.
"""

from pathlib import Path

import click
from safetensors.torch import save_file

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.core.io import atomic_path
from pipeline.data.manifest import read_manifest
from pipeline.features.backbones import build_backbone
from pipeline.features.store import read_store
from pipeline.finetuning.warm_start import initial_layer
from pipeline.heads.persistence import load_head

PathArg = click.Path(path_type=Path)


@click.command()
@click.option("--manifest", type=PathArg, required=True, help="For the class names.")
@click.option("--head", type=PathArg, required=True, help="Trained logistic head (read with init_head: logreg).")
@click.option("--features", type=PathArg, required=True, help="Its feature store (read with init_head: logreg).")
@click.option("--out", type=PathArg, required=True, help="The starting layer (safetensors).")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(manifest: Path, head: Path, features: Path, out: Path, params: Path) -> None:
    p = load_params(params)
    entry = p.finetune_backbone
    backbone = build_backbone(entry.backbone, entry.weights_path, p.extract.allow_download)
    store = read_store(features, splits=("train", "val")) if p.finetune.init_head == "logreg" else None
    warm = load_head(head, store) if store is not None else None
    layer = initial_layer(backbone, read_manifest(manifest), p.finetune, warm, entry.weights, store)
    with atomic_path(out) as tmp:
        save_file(layer, tmp)
    start = f"{head}'s C refit on the train split" if warm else f"random weights (seed {p.finetune.seed})"
    click.echo(f"warm_start: {backbone.name}'s new layer starts from {start} -> {out}")


if __name__ == "__main__":
    main()
