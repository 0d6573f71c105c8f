"""Where near-copies and distinct photos fall in embedding cosine similarity: the evidence for `duplicate_threshold`.

    python benchmarks/duplicate_threshold.py [--data ../shared/datasets/hymenoptera] [--photos 100] [--seed 0]

Embeds `--photos` real photos (half per class, drawn at random from train and val) with the project's default
backbone and its eval preprocessing (the extract stage's resize + centre crop at 224 px), and five modified
copies of each: JPEG re-encoded at quality 60, resized to 50% per side, a 90% centre crop (per side), flipped
left-right, 10% brighter. Prints, per modification, the cosine of each photo with its copy (min, 1st
percentile, median); over all pairs of distinct photos, of the same class and of different classes (max,
99.9th and 99th percentile), with the most similar distinct pairs named (a dataset can hold real near-copies);
what thresholds from 0.75 to 0.95 would miss and flag, and a suggested threshold halfway between the copies'
low end and the distinct photos' high end.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import torch
from PIL import Image, ImageEnhance

from pipeline.data.images import decode_rgb, read_bytes
from pipeline.features.backbones import Backbone, build_backbone

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "hymenoptera"


def _jpeg(img: Image.Image, quality: int = 60) -> Image.Image:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality)
    return decode_rgb(buffer.getvalue())


def _centre_crop(img: Image.Image, keep: float = 0.9) -> Image.Image:
    w, h = img.size
    cw, ch = round(w * keep), round(h * keep)
    left, top = (w - cw) // 2, (h - ch) // 2
    return img.crop((left, top, left + cw, top + ch))


MODIFICATIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg q60": _jpeg,
    "resize 50%": lambda img: img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BICUBIC),
    "crop 90%": _centre_crop,
    "flip": lambda img: img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "brightness +10%": lambda img: ImageEnhance.Brightness(img).enhance(1.1),
}


def pick_photos(data: Path, n: int, seed: int) -> list[Path]:
    """`n` photos, half of each class (train and val together), in a seeded random order."""
    by_class: dict[str, list[Path]] = {}
    for path in sorted(data.rglob("*.jpg")):
        by_class.setdefault(path.parent.name, []).append(path)
    rng = random.Random(seed)
    chosen = []
    for paths in by_class.values():
        chosen += rng.sample(paths, min(len(paths), n // len(by_class)))
    return chosen


@torch.inference_mode()
def embed(backbone: Backbone, images: list[Image.Image], batch_size: int = 32) -> np.ndarray:
    """L2-normalised embeddings [N, D] of PIL images, through the backbone's own eval preprocessing."""
    prep = backbone.preprocessing
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.stack([prep.to_uint8(img) for img in images[start : start + batch_size]])
        out.append(backbone.features(prep.normalize(batch)).double().numpy())
    features = np.concatenate(out)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def copy_similarities(backbone: Backbone, photos: list[Image.Image], originals: np.ndarray) -> dict[str, np.ndarray]:
    """Per modification, each photo's cosine with its modified copy."""
    return {
        name: np.einsum("ij,ij->i", originals, embed(backbone, [modify(img) for img in photos]))
        for name, modify in MODIFICATIONS.items()
    }


def distinct_similarities(originals: np.ndarray, classes: list[str]) -> tuple[dict[str, np.ndarray], list]:
    """Cosines of all pairs of distinct photos, same class and different classes; and the 3 most similar pairs."""
    similarity = originals @ originals.T
    i, j = np.triu_indices(len(originals), k=1)
    same = np.array([classes[a] == classes[b] for a, b in zip(i, j, strict=True)])
    top = np.argsort(-similarity[i, j])[:3]
    return {"same class": similarity[i, j][same], "different classes": similarity[i, j][~same]}, [
        (float(similarity[i[k], j[k]]), int(i[k]), int(j[k])) for k in top
    ]


@click.command()
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=DEFAULT_DATA, show_default=True)
@click.option("--photos", "n_photos", default=100, show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(data: Path, n_photos: int, seed: int) -> None:
    start = time.perf_counter()
    backbone = build_backbone("efficientnet_lite0")
    paths = pick_photos(data, n_photos, seed)
    photos = [decode_rgb(read_bytes(path)) for path in paths]
    classes = [path.parent.name for path in paths]
    originals = embed(backbone, photos)
    copies = copy_similarities(backbone, photos, originals)
    distinct, closest = distinct_similarities(originals, classes)
    print(f"{len(photos)} photos ({backbone.name}, {backbone.preprocessing.crop} px), {len(MODIFICATIONS)} copies each")
    print(f"{'photo vs its copy':<20} {'min':>7} {'p1':>7} {'median':>7}")
    for name, values in copies.items():
        print(f"{name:<20} {values.min():7.4f} {np.percentile(values, 1):7.4f} {np.median(values):7.4f}")
    print(f"{'distinct photos':<20} {'max':>7} {'p99.9':>7} {'p99':>7} {'pairs':>7}")
    for name, values in distinct.items():
        print(
            f"{name:<20} {values.max():7.4f} {np.percentile(values, 99.9):7.4f} {np.percentile(values, 99):7.4f}",
            end="",
        )
        print(f" {len(values):7d}")
    for value, a, b in closest:
        print(f"  closest distinct: {value:.4f} {paths[a].relative_to(data)} ~ {paths[b].relative_to(data)}")
    _suggest(copies, distinct)
    print(f"({time.perf_counter() - start:.0f} s)")


def _suggest(copies: dict[str, np.ndarray], distinct: dict[str, np.ndarray]) -> None:
    """Print what each threshold misses and flags, and one halfway between the copies' 1st percentile and the
    distinct pairs' 99.9th."""
    low = min(float(np.percentile(values, 1)) for values in copies.values())
    high = max(float(np.percentile(values, 99.9)) for values in distinct.values())
    threshold = round((low + high) / 2, 2)
    for candidate in sorted({0.75, 0.80, 0.85, 0.90, 0.95, threshold}):
        missed = {name: int((values < candidate).sum()) for name, values in copies.items()}
        flagged = sum(int((values >= candidate).sum()) for values in distinct.values())
        print(
            f"threshold {candidate:.2f}: misses {sum(missed.values())}/{sum(map(len, copies.values()))} copies "
            f"({', '.join(f'{name} {n}' for name, n in missed.items())}); "
            f"flags {flagged}/{sum(map(len, distinct.values()))} distinct pairs"
        )
    verdict = "a gap" if low > high else "NO gap: they overlap"
    print(f"copies' low end (worst 1st percentile) {low:.4f}; distinct high end (worst 99.9th) {high:.4f}: {verdict}")
    print(f"suggested duplicate_threshold {threshold:.2f}")


if __name__ == "__main__":
    main()
