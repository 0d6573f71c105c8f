"""DVC stage `finetune`: new output layer on the backbone, last blocks unfrozen, trained end to end.

With `finetune.engine: torchrun` it starts itself again as torchrun's ranks (DistributedDataParallel); run under
a torchrun (by hand: how other machines join), it trains as one of the ranks whatever the engine.
"""

import logging
import sys
from pathlib import Path

import click
from safetensors.torch import load_file

from pipeline.core.config import load_params
from pipeline.core.errors import user_errors
from pipeline.finetuning.distributed import launch, ranks_from_env, under_torchrun
from pipeline.finetuning.live import log_epochs
from pipeline.finetuning.training import finetune

PathArg = click.Path(path_type=Path)
EPOCH_KEYS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@click.command()
@click.option("--data", type=PathArg, required=True, help="ImageFolder root the manifest's paths are relative to.")
@click.option("--manifest", type=PathArg, required=True)
@click.option("--init", type=PathArg, required=True, help="The new layer's starting weights (the warm_start stage).")
@click.option("--out", type=PathArg, required=True, help="Directory for model.safetensors and config.json.")
@click.option("--checkpoints", type=PathArg, required=True, help="Checkpoint cache, outside DVC's outputs.")
@click.option("--live", type=PathArg, required=True, help="DVCLive folder for the per-epoch curves.")
@click.option("--params", type=PathArg, default=Path("params.yaml"), show_default=True)
@user_errors
def main(data: Path, manifest: Path, init: Path, out: Path, checkpoints: Path, live: Path, params: Path) -> None:
    p = load_params(params)
    if p.finetune.engine == "torchrun" and not under_torchrun():  # load_params refused an uneven batch split
        launch(p.finetune.torchrun, "stages.finetune", sys.argv[1:])
        return
    ranks = ranks_from_env()
    if ranks.local_rank:  # one log per machine
        logging.getLogger().setLevel(logging.WARNING)
    entry = p.finetune_backbone  # the network, weights and size the frozen features came from
    result = finetune(
        manifest,
        data,
        entry.backbone,
        p.finetune,
        out,
        checkpoints,
        initial=load_file(init),
        weights=entry.weights_path,
        ranks=ranks,
    )
    if not result.writes:  # another rank writes the outputs
        return
    log_epochs(live, result.history, EPOCH_KEYS, result.best_epoch)
    resumed = f", resumed at epoch {result.resumed_from_epoch + 1}" if result.resumed_from_epoch else ""
    if result.resumed_from_epoch == result.epochs_run:
        resumed = ", all from a finished checkpoint of the same inputs and code"
    where = f"{result.processes} x {result.device}" if result.processes > 1 else result.device
    click.echo(
        f"finetune: {result.epochs_run} epochs{resumed} (best {result.best_epoch}, val accuracy "
        f"{result.history[result.best_epoch - 1]['val_accuracy']:.4f}), {result.trainable_params:,} of "
        f"{result.total_params:,} parameters trained in {result.train_seconds:.1f}s on {where} -> {out}"
    )


if __name__ == "__main__":
    main()
