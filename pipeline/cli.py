"""The `transfer` command: everything outside the DVC graph (backbones, samples, store inspection)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from pipeline.core.errors import PipelineError, user_errors

DATA_ROOT = Path("data", "raw")  # prepare's --data in dvc.yaml, relative to the repository's root


@click.group()
def main() -> None:
    """Transfer learning for image classification, as a DVC pipeline (run it with `dvc repro`)."""


@main.command()
@user_errors
def backbones() -> None:
    """List the backbones, their feature dimension, and whether their weights are on this machine."""
    from pipeline.features.backbones import list_backbones

    infos = list_backbones()
    width = max(len(i.name) for i in infos)
    click.echo(f"{'name':<{width}}  {'dim':>5}  offline  weights")
    for i in infos:
        dim = "-" if i.feature_dim is None else i.feature_dim  # a family: it depends on the model
        offline = {True: "yes", False: "no", None: "-"}[i.offline]
        click.echo(f"{i.name:<{width}}  {dim:>5}  {offline:<7}  {i.weights}")


@main.group()
def sample() -> None:
    """Write a bundled sample dataset as an ImageFolder."""


@sample.command("digits")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False))
@user_errors
def sample_digits(directory: Path) -> None:
    """scikit-learn's 1,797 handwritten digits (8x8 PNGs, ten classes) into DIRECTORY."""
    from pipeline.data.sample import write_digits

    if directory.exists() and any(directory.iterdir()):
        raise PipelineError(f"{directory} exists and is not empty; choose another directory or remove it")
    n = write_digits(directory)
    click.echo(f"wrote {n} images in 10 classes to {directory}")


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help=f"Replace {DATA_ROOT} when it holds images other than the bundled sample.")
@user_errors
def init(path: Path, force: bool) -> None:
    """Start on your images: put the ImageFolder PATH (PATH/<class>/*.jpg, or train/ val/ test/ folders of class
    folders) at data/raw in place of the bundled sample, and version it with `dvc add`. PATH is never written."""
    from pipeline.data.placement import place_images

    path = path.expanduser()  # `make run DATA=~/photos` from a shell that left the ~ as it was
    root = _dvc_root(Path.cwd())
    placed = place_images(path, Path(os.path.relpath(root / DATA_ROOT)), force=force)
    what = f"{placed.images} images of {placed.classes} classes ({placed.layout} layout) from {path}"
    if placed.found == "the same images":
        click.echo(f"{DATA_ROOT} already holds the {what}; nothing to copy")
    else:
        how = {
            (True, False): "as hard links to the files there (no second copy on disk)",
            (False, True): "as copies (hard links are impossible here: another filesystem)",
            (True, True): f"as hard links ({placed.linked}) and copies ({placed.copied}, where linking failed)",
        }[(bool(placed.linked), bool(placed.copied))]
        replacing = f", replacing {placed.found}" if placed.found else ""
        click.echo(f"{DATA_ROOT}: {what}, {how}{replacing}")
    if placed.not_files:
        click.echo(f"  left out {len(placed.not_files)} entries that are not files (e.g. {placed.not_files[0]})")
    # Linked images keep the inode they share with PATH: --no-relink stops DVC from replacing them with links into
    # its cache (which, with cache.type hardlink, would make PATH's own files the read-only cache).
    no_relink = ["--no-relink"] if placed.linked else []
    _run(root, [sys.executable, "-m", "dvc", "add", "--quiet", *no_relink, str(DATA_ROOT)], "dvc add")
    dvc_file = DATA_ROOT.with_suffix(".dvc")
    staged = _git_add(root, dvc_file, DATA_ROOT.parent / ".gitignore")
    click.echo(
        f"dvc add {DATA_ROOT}: {dvc_file} pins these images; DVC's cache keeps one copy of each"
        + (f" ({dvc_file} staged with git add)" if staged else "")
    )
    steps = [
        ("dvc repro", "the pipeline on these images"),
        (f"git commit -m 'Data: {path.resolve().name}'", "the commit names the images its results came from"),
        ("dvc remote add -d storage URL && dvc push", "share the images, once you have a remote"),
    ]
    width = max(len(command) for command, _ in steps)
    click.echo("Next:\n" + "\n".join(f"  {command:<{width}}  # {why}" for command, why in steps))


def _dvc_root(start: Path) -> Path:
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    raise PipelineError(f"{start} is not inside a DVC repository; run this in the project's folder")


def _run(cwd: Path, args: list[str], what: str) -> None:
    """Run a command; its last line of output as the one-line error when it fails."""
    import subprocess

    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        said = (done.stderr + done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise PipelineError(f"{what} failed: {said[-1]}")


def _git_add(root: Path, *paths: Path) -> bool:
    """git-add the paths that exist, when `root` is inside a git work tree; whether it was."""
    import subprocess

    try:
        inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True, text=True)
    except FileNotFoundError:  # no git on this machine
        return False
    if inside.stdout.strip() != "true":
        return False
    _run(root, ["git", "add", *[str(p) for p in paths if (root / p).exists()]], "git add")
    return True


@main.command()
@click.argument("features", type=click.Path(path_type=Path, dir_okay=False))
@user_errors
def inspect(features: Path) -> None:
    """Describe a feature store: shape, backbone, classes, split sizes, provenance."""
    import h5py

    from pipeline.features.store import SPLIT_CODES, read_attrs

    attrs = read_attrs(features)
    with h5py.File(features, "r") as f:
        shape = f["features"].shape
        split = f["split"][:]
        labels = f["labels"][:]
    classes = attrs["classes"]
    click.echo(f"{features}: {shape[0]} images x {shape[1]} features (float32)")
    shown = ("label", "backbone", "weights_id", "fingerprint", "image_size", "precision", "preprocessing", "created")
    for key in shown:
        click.echo(f"  {key}: {attrs.get(key)}")
    click.echo(f"  manifest_sha256: {attrs.get('manifest_sha256')}")
    click.echo(f"  versions: {attrs.get('versions')}")
    click.echo("  splits: " + ", ".join(f"{name} {int((split == code).sum())}" for name, code in SPLIT_CODES.items()))
    click.echo(f"  classes ({len(classes)}):")
    for index, name in enumerate(classes):
        counts = [int(((labels == index) & (split == code)).sum()) for code in SPLIT_CODES.values()]
        click.echo(f"    {index:>3} {name}: train {counts[0]}, val {counts[1]}, test {counts[2]}")


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--head", type=click.Path(path_type=Path, dir_okay=False), help="A trained head (.h5).")
@click.option("--features", type=click.Path(path_type=Path, dir_okay=False), help="The store the head was trained on.")
@click.option("--finetuned", type=click.Path(path_type=Path, file_okay=False), help="A fine-tuned model directory.")
@click.option(
    "--model",
    type=click.Path(path_type=Path, dir_okay=False),
    help="An exported ONNX model (data/export/<model>.onnx), run by onnxruntime on the CPU without torch.",
)
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option(
    "--num-workers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Decoding processes ahead of a GPU; on CPU, images are decoded by threads between forward passes.",
)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"]), default="auto", show_default=True)
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True)
@click.option("--output", type=click.Path(path_type=Path, dir_okay=False), help="Write here instead of stdout.")
@user_errors
def predict(inputs, head, features, finetuned, model, top_k, batch_size, num_workers, device, fmt, output) -> None:
    """Classify image files or folders with a head (--head and --features), a fine-tuned model (--finetuned) or
    an exported one (--model).

    Files that cannot be read as images are listed on stderr with their reason; the rest are predicted.
    """
    from pipeline.core.io import write_text
    from pipeline.data.listing import list_images

    if bool(head) + bool(finetuned) + bool(model) != 1 or bool(head) != bool(features):
        raise click.UsageError("give either --head with --features, or --finetuned, or --model")
    if model and device not in ("auto", "cpu"):
        raise click.UsageError(f"--model runs on onnxruntime's CPU provider; --device {device} is for the others")
    paths = list_images(list(inputs))  # a mistyped path fails before any model is loaded
    if model:
        # Imports no torch: a machine that serves exported models needs only onnxruntime, Pillow and numpy.
        from pipeline.serving.onnx_predict import OnnxPredictor

        predictor = OnnxPredictor(model)
        predictions, rejected = predictor.predict(paths, top_k, batch_size)
    else:
        from pipeline.serving.predict import finetuned_predictor, head_predictor

        predictor = head_predictor(head, features, device) if head else finetuned_predictor(finetuned, device)
        predictions, rejected = predictor.predict(paths, top_k, batch_size, num_workers)
    for r in rejected:
        click.echo(f"rejected {_shown(r.path)}: {r.reason} ({r.detail})", err=True)
    if not predictions:  # before --output is written: no file that looks like an answer
        raise PipelineError(f"none of the {len(paths)} files given could be read as an image")
    text = _formatted(predictions, rejected, fmt, min(top_k, len(predictor.classes)))
    if output:
        write_text(output, text)
    else:
        click.echo(text, nl=False)
    click.echo(f"predicted {len(predictions)} images, rejected {len(rejected)}", err=True)


def _shown(path: str) -> str:
    """A path as UTF-8 text: bytes of a name that is not valid UTF-8 are escaped (`bad\\xffname.png`)."""
    import os

    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _formatted(predictions: list, rejected: list, fmt: str, k: int) -> str:
    """Predictions as JSON (with the rejected files) or as CSV with k (class, probability) column pairs."""
    import csv
    import io
    import json

    buffer = io.StringIO()
    if fmt == "json":
        payload = {
            "predictions": [
                {"path": _shown(p.path), "top": [{"class": c, "probability": q} for c, q in p.top]} for p in predictions
            ],
            "rejected": [{"path": _shown(r.path), "reason": r.reason, "detail": r.detail} for r in rejected],
        }
        buffer.write(json.dumps(payload, indent=2) + "\n")
    else:
        writer = csv.writer(buffer)
        writer.writerow(["path", *[f"{name}_{i}" for i in range(1, k + 1) for name in ("class", "probability")]])
        for p in predictions:
            writer.writerow([_shown(p.path), *[v for c, q in p.top for v in (c, f"{q:.6f}")]])
    return buffer.getvalue()
