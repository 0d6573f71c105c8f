"""WiSE-FT against plain fine-tuning and the linear probe it starts from: the evidence for the finetune-wise model
(issue 28, item 3).

    nice -n 5 python benchmarks/wise.py [--data ../shared/datasets/hymenoptera] [--epochs N] [--image-size PX]
        [--work /tmp/wise]

The pipeline's own path, as benchmarks/finetune_lr.py runs it (prepare's manifest, the extract stage's code, the
logreg head, the warm_start stage's layer, the finetune stage's code; params.yaml's settings on the CPU, reduced only
by what --epochs and --image-size say), then the finetune_wise stage's code (finetune_wise.alphas scored on the val
split) and the test predictions of the three models. Prints the curve (val accuracy and log loss, and for reading
only, never for choosing, each alpha's test accuracy: what a perfect choice could reach) and, as lines a script can
read:

    wise: data=D model=M test_accuracy=A correct=C n=T
    wise: data=D alpha=X (chosen on N val images) wise_minus_finetune=X low=L high=H p=P verdict=V
    wise: data=D wise_minus_probe=X low=L high=H p=P verdict=V

(pipeline.results.stats.compare on the same test images: the exact McNemar test and its dual 95% interval; verdict:
which model is more accurate where p < 0.05, none otherwise.) The embedding cache and the fine-tuning checkpoints
under --work make a rerun cost seconds.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_lr import HYMENOPTERA, REPO, Start, pipeline_start, reduced  # noqa: E402

from pipeline.core.config import FinetuneParams, load_params  # noqa: E402
from pipeline.core.device import Runtime  # noqa: E402
from pipeline.data.loading import Images, image_batches  # noqa: E402
from pipeline.data.manifest import read_manifest  # noqa: E402
from pipeline.features.backbones import build_backbone  # noqa: E402
from pipeline.finetuning.model import load_finetuned, predict_test_split  # noqa: E402
from pipeline.finetuning.training import finetune  # noqa: E402
from pipeline.finetuning.wise import score_curve, starting_network, wise_finetune  # noqa: E402
from pipeline.results.stats import compare  # noqa: E402


def _compare(name: str, what: str, a, b, labels: tuple[str, str]) -> None:
    r = compare(a, b)
    verdict = {"a": labels[0], "b": labels[1]}.get(r.verdict, "none")
    click.echo(
        f"wise: data={name} {what}={r.difference:+.4f} low={r.interval[0]:+.4f} high={r.interval[1]:+.4f} "
        f"p={r.mcnemar.p_value:.3g} verdict={verdict}"
    )


def test_curve(start: Start, tuned_dir: Path, data: Path, alphas: list[float], tune: FinetuneParams) -> list:
    """Every alpha's accuracy and log loss on the test split (the curve finetune_wise scores on val), for reading."""
    manifest = read_manifest(start.manifest)
    rows = [r for r in manifest.ok_rows() if r.split == "test"]
    tuned, _, preprocessing = load_finetuned(tuned_dir)
    backbone = build_backbone(start.entry.backbone, start.entry.weights_path)
    network = starting_network(backbone, start.layer, len(manifest.classes))
    runtime = Runtime.resolve(tune.device, tune.precision, option="finetune.device")
    images = Images.of_rows(data, rows, preprocessing.to_uint8)
    batches = image_batches(images, tune.batch_size, tune.num_workers, runtime.device)
    labels = np.array([manifest.classes.index(r.class_name) for r in rows], dtype=np.int64)
    return score_curve(network, tuned, alphas, batches, labels, runtime, preprocessing.normalize)


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=HYMENOPTERA, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Instead of finetune.epochs.")
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="Pixels, instead of the backbone's.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/wise"), show_default=True)
def main(data: Path, epochs: int | None, image_size: int | None, work: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    p = load_params(REPO / "params.yaml")
    extract_params, tune, changes = reduced(p, epochs, image_size)
    start = pipeline_start(p, extract_params, tune, data, work)
    manifest_path, entry, tune, layer, probe = start.manifest, start.entry, start.tune, start.layer, start.probe
    tuned_dir = work / "finetune"
    finetune(manifest_path, data, entry.backbone, tune, tuned_dir, work / "checkpoints", initial=layer,
             weights=entry.weights_path)  # fmt: skip
    wise = wise_finetune(
        tuned_dir, layer, manifest_path, data, work / "finetune_wise", p.finetune_wise.alphas, tune,
        backbone_name=entry.backbone, weights=entry.weights_path,
    )  # fmt: skip
    click.echo(f"\n{data.name}: {entry.backbone} at {tune.image_size} px; reduced from params.yaml: {changes}")
    on_test = {point.alpha: point for point in test_curve(start, tuned_dir, data, p.finetune_wise.alphas, tune)}
    click.echo("| alpha | val accuracy | val log loss | test accuracy (not used to choose) |\n|---|---|---|---|")
    for point in wise.curve:
        test = on_test[point.alpha].val_accuracy
        click.echo(f"| {point.alpha:g} | {point.val_accuracy:.4f} | {point.val_log_loss:.4f} | {test:.4f} |")
    correct = {"logreg": np.array(probe.predicted) == np.array(probe.actual)}
    for model, folder in (("finetune", tuned_dir), ("finetune-wise", work / "finetune_wise")):
        answers = predict_test_split(folder, manifest_path, data, tune)
        assert [r.path for r in answers.rows] == probe.paths  # the same test images, in the same order
        correct[model] = answers.proba.argmax(1) == answers.labels
    for model, hits in correct.items():
        click.echo(
            f"wise: data={data.name} model={model} test_accuracy={hits.mean():.4f} correct={int(hits.sum())} "
            f"n={len(hits)}"
        )
    click.echo(f"wise: data={data.name} alpha={wise.alpha:g} (chosen on {wise.n_val} val images)")
    _compare(data.name, "wise_minus_finetune", correct["finetune-wise"], correct["finetune"], ("wise", "finetune"))
    _compare(data.name, "wise_minus_probe", correct["finetune-wise"], correct["logreg"], ("wise", "logreg"))


if __name__ == "__main__":
    main()
