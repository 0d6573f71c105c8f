"""Fine-tuning's learning rate on photos: the evidence for `finetune.lr` in params.yaml.

    nice -n 5 python benchmarks/finetune_lr.py [--lrs 3e-4,1e-3,3e-3,1e-2] [--epochs N] [--image-size PX]
        [--seed N] [--data ../shared/datasets/hymenoptera] [--params params.yaml] [--work /tmp/finetune_lr]

The pipeline's own path on hymenoptera (ants vs bees: its train/ folder gives train, and val carved from it by
prepare.val_fraction; its val/ folder is the test split): prepare's manifest, the extract stage's code with
params.yaml's extract settings, the logreg head (heads.logreg), the warm_start stage's starting layer
(finetune.init_head), then for each learning rate the finetune stage's code and the evaluate_finetune stage's test
predictions. Everything is params.yaml's (on the CPU) except `finetune.lr`, and what --epochs and --image-size
reduce to fit a small machine: a reduced image size is the backbone entry's (extraction, the head and the warm start
see it too, as they would with that image_size in params.yaml). Prints, for each learning rate: epochs run, the
epoch kept (lowest val loss), its val loss and val accuracy, test accuracy, and training seconds; and the logistic
head's test accuracy (where every run starts).

One seed: finetune.seed, or --seed (the order of the training images and their augmentation; the warm start is
the same logistic head whatever the seed). The embedding cache and the fine-tuning checkpoints under --work make a
rerun cost seconds (its seconds are those of the first run, from the checkpoints' history).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import click

from pipeline.core.config import BackboneParams, ExtractParams, FinetuneParams, Params, load_params
from pipeline.data.manifest import build_manifest, write_manifest
from pipeline.features.backbones import build_backbone
from pipeline.features.extraction import ExtractResult, extract
from pipeline.features.store import read_store
from pipeline.finetuning.model import predict_test_split
from pipeline.finetuning.training import finetune, with_input_size
from pipeline.finetuning.warm_start import initial_layer
from pipeline.heads.persistence import load_head, save_head
from pipeline.heads.selection import train_head
from pipeline.results.metrics import Scored
from pipeline.results.scoring import evaluate_head

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"
LRS = "3e-4,1e-3,3e-3,1e-2"


def parse_lrs(text: str) -> list[float]:
    """`3e-4,1e-3` -> [0.0003, 0.001]: positive numbers, each once, in the order given."""
    try:
        lrs = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise click.BadParameter(f"expected comma-separated numbers, e.g. {LRS}; got {text!r}") from err
    if not lrs or any(not lr > 0 or lr == float("inf") for lr in lrs):
        raise click.BadParameter(f"expected positive learning rates, e.g. {LRS}; got {text!r}")
    if len(set(lrs)) < len(lrs):
        raise click.BadParameter(f"a learning rate is listed twice in {text!r}")
    return lrs


def reduced(
    params: Params, epochs: int | None, image_size: int | None, seed: int | None = None
) -> tuple[ExtractParams, FinetuneParams, str]:
    """params.yaml's extract and finetune sections for the benchmark: on the CPU, only the fine-tuned backbone's
    entry, with `epochs`, `image_size` and `seed` when given (the size is the entry's: extraction, the head and the
    warm start see it too, as the pipeline would); and in words what was reduced ("nothing" when neither `epochs`
    nor `image_size` is given)."""
    label = params.finetune.backbone or next(iter(params.extract.backbones))
    entry = params.extract.backbones[label]
    tune = replace(params.finetune, device="cpu", engine="local", seed=params.finetune.seed if seed is None else seed)
    changes = []
    if image_size is not None:
        entry = replace(entry, image_size=image_size)
        tune = replace(tune, image_size=image_size)
        changes.append(f"image_size {image_size} px (params.yaml: {params.finetune.image_size})")
    if epochs is not None:
        tune = replace(tune, epochs=epochs)
        changes.append(f"epochs {epochs} (params.yaml: {params.finetune.epochs})")
    extract_params = replace(params.extract, backbones={label: entry}, device="cpu", engine="local")
    return extract_params, tune, ", ".join(changes) or "nothing"


@dataclass(frozen=True)
class Start:
    """Where a benchmark's fine-tuning runs start, as the prepare, extract, head and warm_start stages leave it."""

    manifest: Path
    counts: dict  # images per split (Manifest.counts)
    entry: BackboneParams  # the fine-tuned backbone's extract entry, its network named
    tune: FinetuneParams  # with its input size resolved
    extracted: ExtractResult
    probe: Scored  # the logistic head's test scores (the warm start's own)
    layer: dict  # the warm_start layer


def pipeline_start(p: Params, extract_params: ExtractParams, tune: FinetuneParams, data: Path, work: Path) -> Start:
    """prepare's manifest of `data`, the extract stage's store (cached under work/cache), the logreg head
    (heads.logreg) scored on test, and the warm_start stage's layer (finetune.init_head), all under `work`."""
    label = next(iter(extract_params.backbones))
    entry = extract_params.backbone(label)
    work.mkdir(parents=True, exist_ok=True)
    manifest_path, store_path, head_path = work / "manifest.csv", work / f"{label}.h5", work / "logreg.h5"
    manifest = build_manifest(
        data, p.prepare.val_fraction, p.prepare.test_fraction, p.prepare.seed, num_workers=p.prepare.num_workers
    )
    write_manifest(manifest, manifest_path)
    extracted = extract(manifest_path, data, store_path, work / "cache", extract_params, label)
    save_head(train_head(read_store(store_path), "logreg", p.heads["logreg"]), head_path)
    probe = evaluate_head(store_path, head_path, p.evaluate)
    backbone = build_backbone(entry.backbone, entry.weights_path)
    tune = with_input_size(tune, backbone, manifest)
    warm = load_head(head_path) if tune.init_head == "logreg" else None
    layer = initial_layer(backbone, manifest, tune, warm, entry.weights, read_store(store_path))
    return Start(manifest_path, manifest.counts(), entry, tune, extracted, probe, layer)


def table(rows: list[dict]) -> str:
    """The results as a Markdown table, one row per learning rate."""
    lines = [
        "| lr | epochs run | kept epoch | val loss | val accuracy | test accuracy | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['lr']:g} | {r['epochs_run']} | {r['best_epoch']} | {r['val_loss']:.4f} | "
            f"{r['val_accuracy']:.3f} ({r['val_correct']}/{r['n_val']}) | "
            f"{r['test_accuracy']:.3f} ({r['test_correct']}/{r['n_test']}) | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


@click.command()
@click.option("--lrs", default=LRS, show_default=True, help="Learning rates of the new layer, comma-separated.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Instead of finetune.epochs.")
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Pixels, instead of the backbone's.")
@click.option("--seed", type=int, default=None, help="Instead of finetune.seed (shuffling and augmentation).")
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=HYMENOPTERA, show_default=True)
@click.option("--params", type=click.Path(path_type=Path, exists=True), default=REPO / "params.yaml")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/finetune_lr"), show_default=True)
def main(
    lrs: str, epochs: int | None, image_size: int | None, seed: int | None, data: Path, params: Path, work: Path
) -> None:
    lr_values = parse_lrs(lrs)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    p = load_params(params)
    extract_params, tune, changes = reduced(p, epochs, image_size, seed)
    start = pipeline_start(p, extract_params, tune, data, work)
    manifest_path, counts, entry, tune, initial = start.manifest, start.counts, start.entry, start.tune, start.layer
    extracted, probe = start.extracted, start.probe.record["accuracy"]

    rows = []
    for lr in lr_values:
        start = time.perf_counter()
        run = replace(tune, lr=lr)
        model_dir = work / f"lr-{lr:g}"
        result = finetune(
            manifest_path, data, entry.backbone, run, model_dir, work / "checkpoints", initial=initial,
            weights=entry.weights_path,
        )  # fmt: skip
        answers = predict_test_split(model_dir, manifest_path, data, run)
        kept = result.history[result.best_epoch - 1]
        correct = int((answers.proba.argmax(1) == answers.labels).sum())
        rows.append(
            {
                "lr": lr,
                "epochs_run": result.epochs_run,
                "best_epoch": result.best_epoch,
                "val_loss": kept["val_loss"],
                "val_accuracy": kept["val_accuracy"],
                "val_correct": round(kept["val_accuracy"] * counts["n_val"]),
                "n_val": counts["n_val"],
                "test_accuracy": correct / len(answers.labels),
                "test_correct": correct,
                "n_test": len(answers.labels),
                "seconds": result.train_seconds,
            }
        )
        click.echo(f"lr {lr:g}: done in {time.perf_counter() - start:.0f}s (training and test predictions)")

    click.echo(
        f"\n{data.name}: train {counts['n_train']} / val {counts['n_val']} / test {counts['n_test']} images, "
        f"{entry.backbone} at {tune.image_size} px, unfreeze {tune.unfreeze}, init_head {tune.init_head}, "
        f"augment {tune.augment}, batch {tune.batch_size}, up to {tune.epochs} epochs, patience "
        f"{tune.early_stopping_patience}, seed {tune.seed}, CPU; reduced from params.yaml: {changes}"
    )
    click.echo(f"Logistic head (heads.logreg, the warm start): test accuracy {probe:.3f}")
    click.echo(f"Extraction: {extracted.computed} images embedded, {extracted.reused} from the cache\n")
    click.echo(table(rows))


if __name__ == "__main__":
    main()
