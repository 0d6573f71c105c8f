"""Where near-copies and distinct images fall in embedding cosine, on three kinds of image: the evidence for
`audit.duplicate_threshold: auto`.

    python benchmarks/duplicate_threshold.py [--datasets hymenoptera,digits,shapes] [--copies 24] [--seed 0]
        [--work /tmp/duplicate_threshold]

Each dataset is laid out as an ImageFolder with train/ and test/ folders (hymenoptera: its own train/ and val/;
the digits sample and generated shapes: 80% / 20% per class, seeded), and `--copies` train images get a near-copy
in test/ for each modification: a 2-8% crop (per side, at random), brightness x0.9-1.1, a JPEG re-encode at
quality 60-90, a left-right flip, and all of crop, brightness and JPEG at once (what issue 27 planted). Then the
pipeline's own path: prepare's manifest (val carved from train/), the extract stage's code with params.yaml's
extract settings (efficientnet_lite0, image_size auto, on the CPU), the audit's nearest-neighbour rule and its
cross-split search. Prints, per dataset:

- the cosine of each copy with its original, per modification (min, 5th percentile, median);
- each train image's nearest-neighbour cosine within train (the distribution the `auto` rule reads), and each
  distinct held-out image's nearest cosine to train (what could become a false pair);
- the threshold the rule chooses and why, and what the audit finds at it and at fixed thresholds: copies found
  (of those planted) and the other pairs it lists.

The embedding cache under --work makes a second run cost seconds.
"""

from __future__ import annotations

import io
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from pipeline.core.config import ExtractParams
from pipeline.data.images import decode_rgb, read_bytes
from pipeline.data.manifest import build_manifest, write_manifest
from pipeline.data.sample import write_digits
from pipeline.features.extraction import extract
from pipeline.features.store import SPLIT_CODES, read_store
from pipeline.heads.neighbors import top_k
from pipeline.results.audit import cross_split_duplicates, duplicate_threshold, nearest_neighbour_cosines

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FIXED = (0.80, 0.90, 0.95)


def _crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """Cut 2-8% of each side's length (at least one pixel), split at random between its two ends."""
    w, h = img.size
    cut_w, cut_h = (max(1, round(side * rng.uniform(0.02, 0.08))) for side in (w, h))
    left, top = rng.randint(0, cut_w), rng.randint(0, cut_h)
    return img.crop((left, top, w - (cut_w - left), h - (cut_h - top)))


def _brightness(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageEnhance.Brightness(img).enhance(rng.choice([-1, 1]) * rng.uniform(0.03, 0.10) + 1)


def _jpeg(img: Image.Image, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=rng.randint(60, 90))
    return decode_rgb(buffer.getvalue())


MODIFICATIONS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "crop 2-8%": _crop,
    "brightness +-10%": _brightness,
    "jpeg q60-90": _jpeg,
    "flip": lambda img, rng: img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "crop+bright+jpeg": lambda img, rng: _jpeg(_brightness(_crop(img, rng), rng), rng),
}


def _split_flat(flat: Path, root: Path, seed: int) -> None:
    """Move a flat ImageFolder's files into root/train and root/test, 80% / 20% per class, seeded."""
    rng = random.Random(seed)
    for folder in sorted(p for p in flat.iterdir() if p.is_dir()):
        files = sorted(folder.iterdir())
        rng.shuffle(files)
        n_test = len(files) // 5
        for k, path in enumerate(files):
            target = root / ("test" if k < n_test else "train") / folder.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, target)
    shutil.rmtree(flat)


def _shape_image(kind: str, rng: random.Random, size: int = 224) -> Image.Image:
    """A 224 px picture of one kind of shape: a random two-colour gradient, smoothed noise texture, 2-6 shapes of
    random colour, size, place and rotation."""
    a, b = (np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64) for _ in range(2))
    ramp = np.linspace(0, 1, size)[:, None, None]
    pixels = a * (1 - ramp) + b * ramp + np.random.default_rng(rng.randint(0, 2**31)).normal(0, 25, (size, size, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).filter(ImageFilter.BLUR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 6)):
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        r = rng.randint(12, 50)
        x, y = rng.randint(r, size - r), rng.randint(r, size - r)
        if kind == "circles":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == "squares":
            draw.regular_polygon((x, y, r), 4, rotation=rng.uniform(0, 90), fill=colour)
        elif kind == "triangles":
            draw.regular_polygon((x, y, r), 3, rotation=rng.uniform(0, 120), fill=colour)
        else:  # stripes
            draw.line((x - r, y - r, x + r, y + r * rng.uniform(-1, 1)), fill=colour, width=rng.randint(3, 10))
    return img


def _polygon_image(sides: int, rng: random.Random, size: int = 224) -> Image.Image:
    """A 224 px picture of one small regular polygon of `sides` sides (random colour, size 14-40 px, place and
    rotation) on the shapes' textured background: telling 6, 7 and 8 sides apart is hard at that size."""
    img = _shape_image("none", rng, size)  # background and distractor strokes ...
    img = Image.blend(img, img.filter(ImageFilter.GaussianBlur(6)), 0.5)  # ... softened under the polygon
    draw = ImageDraw.Draw(img)
    r = rng.randint(14, 40)
    x, y = rng.randint(r, size - r), rng.randint(r, size - r)
    draw.regular_polygon(
        (x, y, r), sides, rotation=rng.uniform(0, 360), fill=tuple(rng.randint(0, 255) for _ in range(3))
    )
    return img


def write_dataset(name: str, root: Path, seed: int) -> None:
    """root/train/<class>/ and root/test/<class>/ of distinct images."""
    if name == "hymenoptera":
        shutil.copytree(SHARED / "hymenoptera" / "train", root / "train")
        shutil.copytree(SHARED / "hymenoptera" / "val", root / "test")
    elif name == "digits":
        write_digits(root / "flat")
        _split_flat(root / "flat", root, seed)
    elif name == "shapes":
        rng = random.Random(seed)
        for kind in ("circles", "squares", "triangles", "stripes"):
            (root / "flat" / kind).mkdir(parents=True)
            for k in range(75):
                _shape_image(kind, rng).save(root / "flat" / kind / f"{k:03d}.jpg", "JPEG", quality=95)
        _split_flat(root / "flat", root, seed)
    elif name == "polygons":
        rng = random.Random(seed)
        for sides in range(3, 9):
            (root / "flat" / f"{sides}_sides").mkdir(parents=True)
            for k in range(75):
                image = _polygon_image(sides, rng)
                image.save(root / "flat" / f"{sides}_sides" / f"{k:03d}.jpg", "JPEG", quality=95)
        _split_flat(root / "flat", root, seed)
    else:
        raise click.BadParameter(f"unknown dataset {name!r}; expected hymenoptera, digits, shapes or polygons")


def plant_copies(root: Path, n: int, seed: int) -> list[tuple[str, str, str]]:
    """For `n` train images (seeded), one copy per modification in test/; (original, copy, modification) paths
    relative to `root`."""
    rng = random.Random(seed)
    originals = sorted((root / "train").rglob("*.*"))
    planted = []
    for original in rng.sample(originals, n):
        img = decode_rgb(read_bytes(original))
        for k, (name, modify) in enumerate(MODIFICATIONS.items()):
            target = root / "test" / original.parent.name / f"copy{k}_{original.stem}.png"
            modify(img, rng).save(target)
            planted.append((str(original.relative_to(root)), str(target.relative_to(root)), name))
    return planted


def _quantiles(values: np.ndarray, which: tuple[float, ...]) -> str:
    return " ".join(f"{np.percentile(values, q):7.3f}" for q in which)


def measure(name: str, work: Path, n_copies: int, seed: int) -> None:
    start = time.perf_counter()
    root = work / name / "raw"
    if root.exists():
        shutil.rmtree(root)
    write_dataset(name, root, seed)
    planted = plant_copies(root, n_copies, seed)
    manifest = build_manifest(root, val_fraction=0.15, test_fraction=0.15, seed=0)
    write_manifest(manifest, work / name / "manifest.csv")
    result = extract(
        work / name / "manifest.csv", root, work / name / "store.h5", work / "cache", ExtractParams(device="cpu")
    )
    store = read_store(result.store)
    row = {path: i for i, path in enumerate(store.paths)}
    features = np.asarray(store.features, dtype=np.float64)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    copy_rows = {row[c] for _, c, _ in planted}
    counts = {s: int((store.split == code).sum()) for s, code in SPLIT_CODES.items()}
    print(f"\n== {name}: {result.images} images ({counts}), {result.image_size} px ({result.size_reason})")

    print(f"{'copy vs its original':<22} {'min':>7} {'p5':>7} {'median':>7}")
    by_mod: dict[str, list[float]] = {}
    for original, copy, mod in planted:
        by_mod.setdefault(mod, []).append(float(unit[row[original]] @ unit[row[copy]]))
    for mod, values in by_mod.items():
        print(f"{mod:<22} {_quantiles(np.array(values), (0, 5, 50))}")
    every_copy = np.concatenate([np.array(v) for v in by_mod.values()])

    train = np.flatnonzero(store.split == SPLIT_CODES["train"])
    nearest = nearest_neighbour_cosines(store.features, train, device="cpu")
    held = np.array([i for i in np.flatnonzero(store.split != SPLIT_CODES["train"]) if i not in copy_rows])
    held_nearest = top_k(store.features, store.features, 1, query_rows=held, reference_rows=train)[0][:, 0]
    which = (5, 25, 50, 75, 95, 99, 100)
    print(f"{'nearest neighbour':<22} {'p5':>7} {'p25':>7} {'median':>7} {'p75':>7} {'p95':>7} {'p99':>7} {'max':>7} n")
    print(f"{'train within train':<22} {_quantiles(nearest, which)} {len(nearest)}")
    print(f"{'held-out to train':<22} {_quantiles(held_nearest, which)} {len(held)}")

    threshold, reason = duplicate_threshold(store, "auto", device="cpu")
    print(f"auto: {threshold:.3f} ({reason})")
    planted_pairs = {frozenset((row[o], row[c])) for o, c, _ in planted}
    for value, label in [(threshold, "auto"), *((t, f"{t:.2f}") for t in FIXED)]:
        pairs = cross_split_duplicates(store, value, device="cpu")
        found = {frozenset((row[p.path_a], row[p.path_b])) for p in pairs}
        other = [p for p in pairs if frozenset((row[p.path_a], row[p.path_b])) not in planted_pairs]
        # A copy paired with another image than its original is not a false pair of distinct images.
        distinct = [p for p in other if row[p.path_a] not in copy_rows and row[p.path_b] not in copy_rows]
        missed = int((every_copy < value).sum())
        print(
            f"threshold {label:>5} ({value:.3f}): found {len(planted_pairs & found)}/{len(planted_pairs)} copies "
            f"(below it: {missed}), other pairs {len(other)} ({len(distinct)} between distinct images)"
        )
        if label == "auto":
            for p in other[:5]:
                print(f"  other pair: {p.similarity:.3f} {p.path_a} ({p.split_a}) ~ {p.path_b} ({p.split_b})")
    print(f"({time.perf_counter() - start:.0f} s)")


@click.command()
@click.option("--datasets", default="hymenoptera,digits,shapes", show_default=True)
@click.option("--copies", "n_copies", default=24, show_default=True, help="Train images copied, per modification.")
@click.option("--seed", default=0, show_default=True)
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/duplicate_threshold"), show_default=True)
def main(datasets: str, n_copies: int, seed: int, work: Path) -> None:
    for name in datasets.split(","):
        measure(name, work, n_copies, seed)


if __name__ == "__main__":
    main()
