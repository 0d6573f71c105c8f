"""What the input size costs and buys: one backbone at several sizes on one data set, with a logistic head.

    .venv/bin/python benchmarks/image_size.py [--data FOLDER] [--size 128 --size 224] [--backbone efficientnet_lite0]

Without --data, the bundled digits (8x8 PNGs, written to a temporary folder). For each size: the extraction's
compute seconds on this machine, LogME of the train split, and a logistic head (C grid 0.01..10, chosen as the
head stage chooses it) with its held-out and test accuracy. This is the measurement behind `image_size: auto`
(pipeline.data.preprocessing.input_size): tiny images at 128 px rather than the weights' own size.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from pipeline.core.config import ExtractParams, HeadParams, usable_cores
from pipeline.data.manifest import build_manifest, write_manifest
from pipeline.data.sample import write_digits
from pipeline.features.extraction import extract
from pipeline.features.store import read_store
from pipeline.heads.selection import train_head
from pipeline.heads.trained import held_out
from pipeline.results.scoring import score_head

LOGREG = HeadParams(kind="logreg", grid={"C": [0.01, 0.1, 1.0, 10.0]})


def measure(data: Path, work: Path, backbone: str, size: int) -> str:
    manifest = work / "manifest.csv"
    if not manifest.exists():
        write_manifest(build_manifest(data, 0.15, 0.15, seed=0, num_workers=usable_cores()), manifest)
    params = ExtractParams.of(backbone, image_size=size, device="cpu")
    result = extract(manifest, data, work / f"{size}.h5", work / "cache", params)
    store = read_store(result.store)
    head = train_head(store, "logreg", LOGREG)
    test = score_head(store, result.store, head).record["accuracy"]
    return (
        f"{size:>5} px  extraction {result.compute_seconds:6.1f} s  LogME {result.logme:8.4f}  "
        f"held-out {held_out(head)['val_accuracy']:.4f} ({head.selection.split(' (')[0]})  test {test:.4f}  "
        f"C {head.hyperparameters['C']}"
    )


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None)
@click.option("--size", "sizes", type=int, multiple=True, default=(128, 224), show_default=True)
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
def main(data: Path | None, sizes: tuple[int, ...], backbone: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if data is None:
            data = work / "digits"
            write_digits(data)
        click.echo(f"{data}: {backbone}, a logistic head per size, {usable_cores()} cores")
        for size in sizes:
            click.echo(measure(data, work, backbone, size))


if __name__ == "__main__":
    main()
