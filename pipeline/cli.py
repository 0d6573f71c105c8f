"""The `transfer` command: everything outside the DVC graph (backbones, samples, store inspection)."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.errors import PipelineError, user_errors


@click.group()
def main() -> None:
    """Transfer learning for image classification, as a DVC pipeline (run it with `dvc repro`)."""


@main.command()
@user_errors
def backbones() -> None:
    """List the backbones, their feature dimension, and whether their weights are on this machine."""
    from pipeline.backbones import list_backbones

    infos = list_backbones()
    width = max(len(i.name) for i in infos)
    click.echo(f"{'name':<{width}}  {'dim':>5}  offline  weights")
    for i in infos:
        click.echo(f"{i.name:<{width}}  {i.feature_dim:>5}  {'yes' if i.offline else 'no':<7}  {i.weights}")
    click.echo("timm/<model>: any model of timm.list_models(pretrained=True); weights from the Hugging Face cache")


@main.group()
def sample() -> None:
    """Write a bundled sample dataset as an ImageFolder."""


@sample.command("digits")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@user_errors
def sample_digits(directory: Path) -> None:
    """scikit-learn's 1,797 handwritten digits (8x8 PNGs, ten classes) into DIRECTORY."""
    from pipeline.sample import write_digits

    if directory.exists() and any(directory.iterdir()):
        raise PipelineError(f"{directory} exists and is not empty; choose another directory or remove it")
    n = write_digits(directory)
    click.echo(f"wrote {n} images in 10 classes to {directory}")


@main.command()
@click.argument("features", type=click.Path(path_type=Path, dir_okay=False))
@user_errors
def inspect(features: Path) -> None:
    """Describe a feature store: shape, backbone, classes, split sizes, provenance."""
    import h5py

    from pipeline.store import SPLIT_CODES, read_attrs

    attrs = read_attrs(features)
    with h5py.File(features, "r") as f:
        shape = f["features"].shape
        split = f["split"][:]
        labels = f["labels"][:]
    classes = attrs["classes"]
    click.echo(f"{features}: {shape[0]} images x {shape[1]} features (float32)")
    for key in ("backbone", "weights_id", "fingerprint", "image_size", "precision", "preprocessing", "created"):
        click.echo(f"  {key}: {attrs.get(key)}")
    click.echo(f"  manifest_sha256: {attrs.get('manifest_sha256')}")
    click.echo(f"  versions: {attrs.get('versions')}")
    click.echo("  splits: " + ", ".join(f"{name} {int((split == code).sum())}" for name, code in SPLIT_CODES.items()))
    click.echo(f"  classes ({len(classes)}):")
    for index, name in enumerate(classes):
        counts = [int(((labels == index) & (split == code)).sum()) for code in SPLIT_CODES.values()]
        click.echo(f"    {index:>3} {name}: train {counts[0]}, val {counts[1]}, test {counts[2]}")
